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
from rlhf_jax.data.batching import BatchPlan, Batches, load_splits, pad_right
from rlhf_jax.data.checks import BadRow, BadRows, DataError
from rlhf_jax.data.config import DataConfig, Format
from rlhf_jax.data.formats import (
    PREFERENCE_COLUMNS, TextPairs, detect_preference_format, rows_to_pairs,
)
from rlhf_jax.data.tokenize import encode, join, require_chat_template, special_ids


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


def pairs_of(ds, cfg: DataConfig, tokenizer, source: str) -> tuple[EncodedPairs, str]:
    """Checked, tokenised pairs of a loaded dataset (with rows), and a one-line report of
    dropped rows."""
    ds = sources.rename_columns(ds, cfg.columns, source)
    columns = [c for c in ds.column_names if c != sources.ROW]
    fmt = detect_preference_format(source, columns, ds[0], cfg.format)
    if fmt == Format.CONVERSATIONAL:
        require_chat_template(tokenizer, source, "give prompt/chosen/rejected as strings")
    wanted = [c for c in (*PREFERENCE_COLUMNS[fmt], "prompt", "margin") if c in columns]
    data = ds.select_columns(list(dict.fromkeys(wanted)) + [sources.ROW]).to_dict()
    row_ids = data.pop(sources.ROW)
    bad = BadRows(cfg.on_bad_row, source)
    texts = rows_to_pairs(data, fmt, row_ids, bad, tokenizer)
    pairs = encode_pairs(texts, tokenizer, cfg, bad)
    if len(pairs.margin) == 0:
        raise DataError(f"{bad.summary(len(ds))}: no pairs are left; set data.on_bad_row=error "
                        "to stop at the first bad row and see why")
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
    _, _, pad = special_ids(tokenizer, cfg.add_bos, cfg.add_eos)

    def make(ds, name: str, plan: Callable[..., BatchPlan]) -> PreferenceData:
        pairs, summary = pairs_of(ds, cfg, tokenizer, name)
        return PreferenceData(pairs, plan(pairs.lengths, pairs.group), pad, summary)

    return load_splits(cfg, seed, batch_size, make, process_index, process_count, agree)
