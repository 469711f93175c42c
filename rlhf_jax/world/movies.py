"""The demo's small world: movie-review prompts, a grammar of responses, a hidden gold judge.

Responses are short reviews built from a fixed vocabulary. The gold preference — the
stand-in for human labellers — likes positive, on-topic, well-formed reviews of moderate
length; it is hidden from every model and only labels pairs (with Bradley-Terry noise) and
scores the final evaluation. The corpus mixes praise and criticism evenly, so a model
pretrained on it writes reviews of either kind, and RLHF has something to move.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import numpy as np

from rlhf_jax.config import check
from rlhf_jax.data.sft import SFTFormat

MOVIES = ["the heist", "moon river", "the last train", "paper kites", "iron garden",
          "blue harbor", "the quiet road", "night market", "seven doors", "the glass tower",
          "winter sun", "red canyon", "the long game", "silver lake", "the old mill",
          "city of bells"]
ASPECTS = ["acting", "story", "music", "ending", "camera work", "dialogue", "pacing", "cast"]
POSITIVE = ["great", "wonderful", "moving", "brilliant", "charming", "superb", "lovely",
            "delightful", "gripping", "beautiful"]
NEGATIVE = ["dull", "awful", "boring", "clumsy", "weak", "messy", "tedious", "bland",
            "painful", "flat"]
INTENSIFIERS = ["really", "truly", "quite", "very"]
CLOSERS_POS = ["i loved it.", "watch it.", "a must see.", "highly recommended."]
CLOSERS_NEG = ["i hated it.", "skip it.", "a waste of time.", "not recommended."]

PROMPT_TEMPLATE = "review of {movie}:"


def prompts(rng: np.random.Generator, n: int) -> list[str]:
    return [PROMPT_TEMPLATE.format(movie=MOVIES[i]) for i in rng.integers(0, len(MOVIES), n)]


def _clause(rng: np.random.Generator, positive: bool) -> str:
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    aspect = rng.choice(ASPECTS)
    if rng.random() < 0.4:
        word = f"{rng.choice(INTENSIFIERS)} {word}"
    return f"the {aspect} is {word}"


def review(rng: np.random.Generator, positivity: float) -> str:
    """A review of 1-3 clauses, each positive with probability `positivity`, and a closer."""
    clauses = [_clause(rng, rng.random() < positivity) for _ in range(rng.integers(1, 4))]
    body = ", and ".join(clauses) if len(clauses) < 3 else f"{clauses[0]}, {clauses[1]}, and {clauses[2]}"
    closer = rng.choice(CLOSERS_POS if rng.random() < positivity else CLOSERS_NEG)
    return f" {body}. {closer}"


def corpus(rng: np.random.Generator, n: int) -> list[str]:
    """Pretraining documents: a prompt and a review of random sentiment, ending in a newline."""
    return [p + review(rng, rng.uniform(0, 1)) + "\n" for p in prompts(rng, n)]


def demonstrations(rng: np.random.Generator, n: int) -> list[dict]:
    """SFT rows (prompt, completion): balanced, well-formed reviews."""
    return [{"prompt": p, "completion": review(rng, 0.5)} for p in prompts(rng, n)]


def gold_reward(prompt: str, response: str) -> float:
    """The hidden judge: sentiment, plus form (a closer, not rambling, no repeats)."""
    words = response.replace(",", " ").replace(".", " ").split()
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    score = pos - neg
    text = response.strip()
    if not any(text.endswith(c) for c in CLOSERS_POS + CLOSERS_NEG):
        score -= 1.0  # unfinished review
    score += 0.5 * any(text.endswith(c) for c in CLOSERS_POS)
    score -= 0.25 * max(0, len(words) - 30) / 10  # rambling
    repeats = len(words) - len(set(words))
    score -= 0.1 * max(0, repeats - 6)
    return float(score)


def gold_preference(
    rng: np.random.Generator, prompt: str, a: str, b: str, temperature: float = 1.0
) -> tuple[bool, float]:
    """Labels a pair like a noisy person: P(a ≻ b) = σ((g(a) − g(b)) / temperature).

    Returns (a is chosen, the probability used).
    """
    diff = gold_reward(prompt, a) - gold_reward(prompt, b)
    p = 1.0 / (1.0 + math.exp(-diff / temperature))
    return bool(rng.random() < p), p


def all_words() -> list[str]:
    """Every word the world uses, for training a tokenizer that covers it."""
    words = set()
    for group in (MOVIES, ASPECTS, POSITIVE, NEGATIVE, INTENSIFIERS, CLOSERS_POS, CLOSERS_NEG):
        for item in group:
            words.update(item.replace(".", " .").split())
    return sorted(words | {"review", "of", "the", "is", "and", ":", ","})


def tokenizer_texts(rng: Optional[np.random.Generator] = None, n: int = 2000) -> list[str]:
    rng = rng or np.random.default_rng(0)
    return corpus(rng, n)


# ----------------------------------------------------------------------------- SFT data


@dataclasses.dataclass(frozen=True)
class DemonstrationsConfig:
    """SFT demonstrations generated from this world, with a BPE tokenizer trained on its
    corpus (`rlhf-jax sft`'s `data.synthetic`).

    Attributes:
      num_train: training rows.
      num_eval: held-out rows.
      format: layout of the rows written: prompt_completion, conversational or text.
      vocab_size: size of the tokenizer's vocabulary.
      seed: seed of the generator (data and tokenizer are a pure function of the config).
    """

    num_train: int = 2000
    num_eval: int = 200
    format: SFTFormat = SFTFormat.PROMPT_COMPLETION
    vocab_size: int = 384
    seed: int = 0

    def __post_init__(self):
        check(self.num_train > 0, "num_train", self.num_train, "1 or more")
        check(self.num_eval >= 0, "num_eval", self.num_eval, "0 or more")
        check(self.format != SFTFormat.AUTO, "format", self.format,
              "prompt_completion, conversational or text")


def demonstration_row(prompt: str, completion: str, fmt: SFTFormat) -> dict[str, Any]:
    if fmt == SFTFormat.PROMPT_COMPLETION:
        return {"prompt": prompt, "completion": completion}
    if fmt == SFTFormat.TEXT:
        return {"text": prompt + completion}
    return {"messages": [{"role": "user", "content": prompt},
                         {"role": "assistant", "content": completion.strip()}]}


def write_demonstrations(cfg: DemonstrationsConfig, directory: str) -> dict[str, str]:
    """Writes train.jsonl, eval.jsonl and tokenizer/ under `directory` (kept if already there).

    Returns:
      {"train": path, "eval": path or "" (num_eval = 0), "tokenizer": directory}.
    """
    from rlhf_jax.world.tiny import train_tokenizer

    paths = {"train": os.path.join(directory, "train.jsonl"),
             "eval": os.path.join(directory, "eval.jsonl") if cfg.num_eval else "",
             "tokenizer": os.path.join(directory, "tokenizer")}
    done = os.path.join(directory, "DONE")
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))  # enums as their values
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f) == want:
                return paths
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    for name, n in (("train", cfg.num_train), ("eval", cfg.num_eval)):
        demos = demonstrations(rng, n)
        if paths[name]:
            with open(paths[name], "w") as f:
                f.writelines(json.dumps(demonstration_row(d["prompt"], d["completion"],
                                                          cfg.format)) + "\n" for d in demos)
    train_tokenizer(tokenizer_texts(rng, 1000), cfg.vocab_size, paths["tokenizer"])
    with open(done, "w") as f:
        json.dump(want, f)
    return paths
