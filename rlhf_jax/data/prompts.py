"""Prompts for PPO: rows with a prompt (a string, or a list of {role, content} messages) in,
token lists that leave room for the response out, served in a deterministic, resumable order.

A prompt is encoded as `[BOS] prompt` (BOS only when configured and not already there), the
layout SFT and reward-model data use, so the policy sees what it was trained on. Messages, or
strings with `chat_template: true`, are rendered with the tokenizer's chat template and the
generation prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from rlhf_jax.config import check
from rlhf_jax.data import sources
from rlhf_jax.data.checks import BadRow, BadRows, DataError, check_messages, closest_name
from rlhf_jax.data.config import OnBadRow, Truncation


@dataclasses.dataclass(frozen=True)
class PromptDataConfig:
    """Where the prompts come from and how they are encoded.

    Attributes:
      train: a .json/.jsonl/.csv/.parquet file, a `save_to_disk` directory or a hub name, or
        a .txt file with one prompt per line.
      eval: held-out prompts (same kinds of source); none = `eval_fraction` of `train`.
      eval_fraction: share of `train` held out when `eval` is not given (0 = none).
      column: the column holding each prompt (a string or a list of messages).
      chat_template: render string prompts as one user message with the chat template.
      max_prompt_length: most prompt tokens (BOS included) kept.
      truncation: how a longer prompt is cut: left (keep its end), right, or none (bad row).
      on_bad_row: error (stop, naming the row) or drop (skip, report a count).
      add_bos: put the tokenizer's BOS token first.
      shuffle: shuffle the prompts each epoch (by seed and epoch).
    """

    train: str = ""
    eval: Optional[str] = None
    eval_fraction: float = 0.0
    column: str = "prompt"
    chat_template: bool = False
    max_prompt_length: int = 64
    truncation: Truncation = Truncation.LEFT
    on_bad_row: OnBadRow = OnBadRow.ERROR
    add_bos: bool = True
    shuffle: bool = True

    def __post_init__(self):
        check(bool(self.train), "train", self.train,
              "a prompts file (.jsonl with a 'prompt' field, .txt one per line), a saved "
              "dataset directory or a hub name")
        check(0.0 <= self.eval_fraction < 1.0, "eval_fraction", self.eval_fraction,
              "a fraction in [0, 1)")
        check(self.max_prompt_length >= 1, "max_prompt_length", self.max_prompt_length,
              "1 or more tokens")


class Prompts:
    """Encoded prompts of one split and the order they are served in."""

    def __init__(self, texts: list[str], ids: list[list[int]], seed: int, shuffle: bool,
                 summary: str, source: str):
        """`summary`: one line on what was loaded and dropped; `source`: where from."""
        self.texts, self.ids, self.seed, self.shuffle = texts, ids, seed, shuffle
        self.summary, self.source = summary, source

    def __len__(self) -> int:
        return len(self.ids)

    def require_batch(self, batch_size: int) -> None:
        """Raises a `DataError` naming the source when the prompts fill no batch."""
        if len(self.ids) < batch_size:
            raise DataError(f"{self.source}: {len(self.ids)} prompts are fewer than one batch of "
                            f"batch_size={batch_size}; lower batch_size or add prompts")

    def batch_rows(self, index: int, batch_size: int) -> np.ndarray:
        """Row indices [batch_size] of batch `index` (0-based) of the run.

        Epochs follow one another; each is a permutation (by seed and epoch) cut into
        batches, the last partial batch dropped. The same index always gives the same rows,
        so a resumed run continues the data exactly.
        """
        self.require_batch(batch_size)
        per_epoch = len(self.ids) // batch_size
        epoch, k = divmod(index, per_epoch)
        n = len(self.ids)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle \
            else np.arange(n)
        return order[k * batch_size:(k + 1) * batch_size]


def _read(source: str):
    """A datasets.Dataset of the source; a .txt file gives one 'prompt' per non-empty line."""
    if source.endswith(".txt"):
        import datasets

        try:
            with open(source, encoding="utf-8-sig") as f:  # a leading BOM is not the prompt's
                lines = [line.rstrip("\n") for line in f if line.strip()]
        except OSError as e:
            raise DataError(f"{source}: cannot be read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise DataError(f"{source}: is not UTF-8 text; save it as UTF-8, one prompt per "
                            "line") from None
        if not lines:
            raise DataError(f"{source}: no rows (the file is empty or holds only blank lines); "
                            "write one prompt per line")
        ds = datasets.Dataset.from_dict({"prompt": lines})
        return ds.add_column(sources.ROW, np.arange(len(ds), dtype=np.int64))
    return sources.load_rows(source)


def _prompt_text(value: Any, cfg: PromptDataConfig, tokenizer) -> str:
    if isinstance(value, list):
        messages = check_messages(value, cfg.column)
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(value, str):
        raise BadRow(cfg.column, "not a string",
                     f"expected a string (or a list of messages), got {type(value).__name__}")
    if not value.strip():
        raise BadRow(cfg.column, "empty", "the prompt is empty")
    if cfg.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": value}], tokenize=False,
                                             add_generation_prompt=True)
    return value


def encode_split(ds, source: str, cfg: PromptDataConfig, tokenizer, seed: int) -> Prompts:
    """Validates and encodes every row of `ds` (errors or drops bad rows, by config)."""
    if cfg.column not in ds.column_names:
        found = [c for c in ds.column_names if c != sources.ROW]
        close = closest_name(cfg.column, found)
        hint = f"; did you mean '{close}'? (set prompts.column={close})" if close else \
            "; set prompts.column to the column that holds the prompts"
        raise DataError(f"{source}: no column '{cfg.column}'{hint}. Found columns {found}")
    bad = BadRows(cfg.on_bad_row, source)
    bos = tokenizer.bos_token_id if cfg.add_bos else None
    texts, ids = [], []
    for row, value in zip(ds[sources.ROW], ds[cfg.column]):
        try:
            text = _prompt_text(value, cfg, tokenizer)
            tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
            if bos is not None and tokens[:1] != [bos]:
                tokens = [bos] + tokens
            if len(tokens) > cfg.max_prompt_length:
                if Truncation(cfg.truncation) == Truncation.NONE:
                    raise BadRow(cfg.column, "over-length",
                                 f"the prompt has {len(tokens)} tokens, over max_prompt_length="
                                 f"{cfg.max_prompt_length}; raise it or set "
                                 "prompts.truncation=left")
                keep = cfg.max_prompt_length
                if Truncation(cfg.truncation) == Truncation.LEFT:
                    head = tokens[:1] if bos is not None else []
                    tokens = head + tokens[len(tokens) - keep + len(head):]
                else:
                    tokens = tokens[:keep]
        except BadRow as e:
            bad.report(int(row), e)
            continue
        texts.append(text)
        ids.append(tokens)
    if not ids:
        fix = ("set prompts.on_bad_row=error to stop at the first bad row and see why" if bad.rows
               else "give a source with rows")
        raise DataError(f"{bad.summary(len(ds))}: no usable prompts; {fix}")
    return Prompts(texts, ids, seed, cfg.shuffle, bad.summary(len(ds)), source)


def load_prompts(
    cfg: PromptDataConfig, tokenizer, seed: int, batch_size: Optional[int] = None
) -> tuple[Prompts, Optional[Prompts]]:
    """(training prompts of this host, held-out prompts or None).

    Args:
      cfg: the prompts section.
      tokenizer: a Hugging Face tokenizer (its chat template renders messages).
      seed: seed of the held-out split and of the order prompts are served in.
      batch_size: prompts per batch on this host; with it, too few prompts are refused here,
        naming the file, instead of at the first iteration.
    """
    ds = _read(cfg.train)
    held = None
    if cfg.eval:
        held = encode_split(sources.host_slice(_read(cfg.eval)), cfg.eval, cfg, tokenizer, seed)
    elif cfg.eval_fraction:
        ds, held_ds = sources.hold_out(ds, cfg.eval_fraction, seed, cfg.train)
        held = encode_split(sources.host_slice(held_ds), cfg.train + " (held out)", cfg,
                            tokenizer, seed)
    train = encode_split(sources.host_slice(ds), cfg.train, cfg, tokenizer, seed)
    if batch_size is not None:
        train.require_batch(batch_size)
    return train, held
