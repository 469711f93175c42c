"""Preference pairs: loaded, checked and tokenised once, then served as fixed-shape batches.

    train, held_out = load_preferences(cfg.data, tokenizer, batch_size=32, seed=0)
    batch = train.batch(k)          # batch k of the run, a pure function of (seed, k)

A batch holds B pairs; each pair's two sequences sit next to each other so that the
model scores chosen and rejected in one forward pass of 2B rows, and a batch split over
devices keeps both halves of a pair on the same device:

    input_ids       [B, 2, T] int32   [:, 0] = prompt + chosen, [:, 1] = prompt + rejected
    attention_mask  [B, 2, T] int32   right-padded
    margin          [B] float32       per-pair margin (0 without a margin column)
    weight          [B] float32       1 for a pair, 0 for an empty slot
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from rlhf_jax.data import sources
from rlhf_jax.data.batching import BatchPlan, Batches, pad_right
from rlhf_jax.data.config import DataConfig
from rlhf_jax.data.formats import (
    REQUIRED, BadRow, BadRows, DataError, TextPairs, detect_format, rows_to_pairs,
)
from rlhf_jax.data.tokenize import encode, join, special_ids


@dataclasses.dataclass
class EncodedPairs:
    """Token sequences of every pair, with BOS/EOS, not padded."""

    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    margin: np.ndarray  # [P] float32
    group: np.ndarray  # [P] int64, source row of each pair (pairs of a ranking share it)

    @property
    def lengths(self) -> np.ndarray:
        pairs = zip(self.chosen, self.rejected)
        return np.asarray([max(len(c), len(r)) for c, r in pairs], np.int64)


def encode_pairs(texts: TextPairs, tokenizer, cfg: DataConfig, bad: BadRows) -> EncodedPairs:
    """Tokenises every pair once; over-long rows are cut or reported as bad (all their pairs)."""
    bos, eos, _ = special_ids(tokenizer, cfg.add_bos, cfg.add_eos)
    prompts, chosen, rejected = (encode(tokenizer, t)
                                 for t in (texts.prompt, texts.chosen, texts.rejected))
    joined: dict[int, list[np.ndarray]] = {}
    for i, row in enumerate(texts.group):
        try:
            joined[i], _ = join(prompts[i], (chosen[i], rejected[i]), cfg.max_length,
                                cfg.prompt_truncation, bos, eos)
        except BadRow as e:
            bad.report(row, e)
    keep = [i for i in joined if texts.group[i] not in bad.rows]  # a bad ranking loses all pairs
    return EncodedPairs(
        chosen=[joined[i][0] for i in keep],
        rejected=[joined[i][1] for i in keep],
        margin=np.asarray([texts.margin[i] for i in keep], np.float32),
        group=np.asarray([texts.group[i] for i in keep], np.int64),
    )


class PreferenceData(Batches):
    """One split's pairs on this host, served as fixed-shape batches (see the module doc)."""

    def __init__(self, pairs: EncodedPairs, plan: BatchPlan, pad_id: int, summary: str):
        self.pairs, self.plan, self.pad_id, self.summary = pairs, plan, pad_id, summary

    def __len__(self) -> int:
        return len(self.pairs.margin)

    def collate(self, rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
        empty = np.zeros(0, np.int32)
        seqs = []
        for r in rows:
            seqs += [self.pairs.chosen[r], self.pairs.rejected[r]] if r >= 0 else [empty, empty]
        ids, mask = pad_right(seqs, length, self.pad_id)
        real = rows >= 0
        return {
            "input_ids": ids.reshape(len(rows), 2, length),
            "attention_mask": mask.reshape(len(rows), 2, length),
            "margin": np.where(real, self.pairs.margin[np.maximum(rows, 0)], 0).astype(np.float32),
            "weight": real.astype(np.float32),
        }


def _rename(ds, columns: dict[str, str], source: str):
    found = ds.column_names
    for ours, theirs in columns.items():
        if theirs not in found:
            raise DataError(f"{source}: data.columns.{ours}={theirs!r} names no column; found "
                            f"{[c for c in found if c != sources.ROW]}")
    return ds.rename_columns({theirs: ours for ours, theirs in columns.items() if theirs != ours})


def pairs_of(ds, cfg: DataConfig, tokenizer, source: str) -> tuple[EncodedPairs, str]:
    """Checked, tokenised pairs of a loaded dataset, and a one-line report of dropped rows."""
    if len(ds) == 0:
        raise DataError(f"{source}: has no rows")
    ds = _rename(ds, cfg.columns, source)
    columns = [c for c in ds.column_names if c != sources.ROW]
    fmt = detect_format(source, columns, ds[0], cfg.format)
    wanted = [c for c in (*REQUIRED[fmt], "prompt", "margin") if c in columns]
    data = ds.select_columns(list(dict.fromkeys(wanted)) + [sources.ROW]).to_dict()
    row_ids = data.pop(sources.ROW)
    bad = BadRows(cfg.on_bad_row, source)
    texts = rows_to_pairs(data, fmt, row_ids, bad, tokenizer)
    pairs = encode_pairs(texts, tokenizer, cfg, bad)
    if len(pairs.margin) == 0:
        raise DataError(f"{bad.summary(len(ds))}: no pairs are left")
    kind = f"{fmt.value} format, {len(pairs.margin)} pairs"
    return pairs, f"{bad.summary(len(ds))}; {kind}"


def load_preferences(
    cfg: DataConfig,
    tokenizer,
    batch_size: int,
    seed: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    agree: Optional[Callable] = None,
) -> tuple[PreferenceData, Optional[PreferenceData]]:
    """(train, held-out or None) for this host.

    Args:
      cfg: the data section (sources, format, checks, lengths, buckets).
      tokenizer: a Hugging Face tokenizer (its chat template renders conversations).
      batch_size: pairs per global batch; each of `process_count` hosts serves its share.
      seed: seed of the held-out split and of the shuffle.
      process_index, process_count: this host's slice (default: from jax).
      agree: how hosts agree on batch shapes (default: an all-gather; for tests).
    """
    import jax

    count = jax.process_count() if process_count is None else process_count
    if batch_size % count:
        raise DataError(f"batch size {batch_size} does not split over {count} hosts")
    train_ds, eval_ds, eval_name = sources.train_and_eval(cfg, seed)
    _, _, pad = special_ids(tokenizer, cfg.add_bos, cfg.add_eos)
    buckets = cfg.bucket_lengths()
    extra = {} if agree is None else {"agree": agree}

    def split(ds, name: str, train: bool) -> PreferenceData:
        ds = sources.host_slice(ds, process_index, count)
        pairs, summary = pairs_of(ds, cfg, tokenizer, name)
        plan = BatchPlan(pairs.lengths, pairs.group, batch_size // count, buckets, seed,
                         shuffle=train and cfg.shuffle, drop_last=train, **extra)
        return PreferenceData(pairs, plan, pad, summary)

    train = split(train_ds, cfg.train, True)
    return train, (split(eval_ds, eval_name, False) if eval_ds is not None else None)
