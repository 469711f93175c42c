"""A toy preference dataset with a hidden rule, and a tokenizer for it; made in a second.

Each prompt asks for a review; each response is a handful of words from a small built-in
vocabulary. The hidden rule: a response is better the more positive and the fewer negative
words it has (`hidden_score`). Pairs (or K-way rankings) are drawn so that no two responses
to one prompt tie, which makes the rule learnable to any accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from rlhf_jax.config import check

POSITIVE = ("good", "great", "fine", "nice", "happy", "superb", "lovely", "bright", "warm", "kind")
NEGATIVE = ("bad", "awful", "poor", "sad", "dull", "grim", "ugly", "cold", "harsh", "weak")
NEUTRAL = ("the", "a", "movie", "plot", "actor", "scene", "music", "story", "day", "film",
           "was", "is", "very", "and", "quite", "rather", "with", "of", "ending", "cast")
TOPICS = ("movie", "book", "song", "meal", "trip", "game", "show", "play", "park", "hotel")


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Size and shape of the generated dataset.

    Attributes:
      num_train: training prompts.
      num_eval: held-out prompts.
      responses_per_prompt: 2 writes (prompt, chosen, rejected) rows; K > 2 writes
        rankings (prompt, responses, ranks) that expand into K(K-1)/2 pairs.
      min_words: fewest words in a response.
      max_words: most words in a response.
      vocab_size: size of the BPE tokenizer trained on the generated texts.
      seed: seed of the generator (data and tokenizer are a pure function of the config).
    """

    num_train: int = 2000
    num_eval: int = 200
    responses_per_prompt: int = 2
    min_words: int = 4
    max_words: int = 10
    vocab_size: int = 512
    seed: int = 0

    def __post_init__(self):
        check(self.num_train > 0, "num_train", self.num_train, "1 or more")
        check(self.num_eval >= 0, "num_eval", self.num_eval, "0 or more")
        check(2 <= self.responses_per_prompt <= 6, "responses_per_prompt",
              self.responses_per_prompt, "2 (pairs) to 6 (rankings)")
        check(1 <= self.min_words <= self.max_words, "min_words", self.min_words,
              "between 1 and max_words")


def hidden_score(text: str) -> int:
    """The gold rule: #positive − #negative words."""
    words = text.lower().replace(".", " ").split()
    return sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)


def _response(rng: np.random.Generator, cfg: SyntheticConfig) -> str:
    n = int(rng.integers(cfg.min_words, cfg.max_words + 1))
    kind = rng.choice(3, size=n, p=(0.25, 0.25, 0.5))
    pools = (POSITIVE, NEGATIVE, NEUTRAL)
    return " ".join(pools[k][rng.integers(len(pools[k]))] for k in kind) + "."


def _responses_with_distinct_scores(rng, cfg: SyntheticConfig) -> list[str]:
    out, seen = [], set()
    while len(out) < cfg.responses_per_prompt:
        text = _response(rng, cfg)
        if hidden_score(text) not in seen:
            seen.add(hidden_score(text))
            out.append(text)
    return out


def make_rows(cfg: SyntheticConfig, n: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for _ in range(n):
        prompt = f"Write a review of the {TOPICS[rng.integers(len(TOPICS))]}:"
        responses = _responses_with_distinct_scores(rng, cfg)
        scores = [hidden_score(r) for r in responses]
        if cfg.responses_per_prompt == 2:
            best = int(np.argmax(scores))
            rows.append({"prompt": prompt, "chosen": responses[best],
                         "rejected": responses[1 - best]})
        else:
            order = np.argsort(-np.asarray(scores))
            ranks = np.empty(len(scores), int)
            ranks[order] = np.arange(1, len(scores) + 1)
            rows.append({"prompt": prompt, "responses": responses, "ranks": ranks.tolist()})
    return rows


def write_dataset(cfg: SyntheticConfig, directory: str) -> dict[str, str]:
    """Writes train.jsonl, eval.jsonl and tokenizer/ under `directory` (kept if already there).

    Returns:
      {"train": path, "eval": path or "" (num_eval = 0), "tokenizer": directory}.
    """
    from rlhf_jax.world.tiny import train_tokenizer

    paths = {
        "train": os.path.join(directory, "train.jsonl"),
        "eval": os.path.join(directory, "eval.jsonl") if cfg.num_eval else "",
        "tokenizer": os.path.join(directory, "tokenizer"),
    }
    done = os.path.join(directory, "DONE")
    if os.path.exists(done):
        with open(done) as f:
            if json.load(f) == dataclasses.asdict(cfg):
                return paths
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    splits = {"train": make_rows(cfg, cfg.num_train, rng),
              "eval": make_rows(cfg, cfg.num_eval, rng)}
    for name, rows in splits.items():
        if paths[name]:
            with open(paths[name], "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    words = POSITIVE + NEGATIVE + NEUTRAL + TOPICS + ("Write", "review", "of")
    texts = [f"{w}." for w in words] + [f" {w}:" for w in words]  # with and without a space
    train_tokenizer(texts * 20, cfg.vocab_size, paths["tokenizer"])
    with open(done, "w") as f:
        json.dump(dataclasses.asdict(cfg), f)
    return paths
