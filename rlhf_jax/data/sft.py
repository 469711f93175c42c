"""Demonstrations for supervised fine-tuning: rows → token sequences with a loss mask → batches.

Accepted layouts (`SFTFormat`):
  prompt_completion  prompt (may be empty), completion: strings; loss on the completion
  conversational     messages: a list of {"role", "content"}; rendered with the tokenizer's
                     chat template, loss on the assistant turns only
  text               text: a string; loss on every token (pretraining)

An example is `[BOS] tokens [EOS]` with a loss mask that is 1 on the tokens the model must
learn to write and on the EOS that ends them. The first token of an example is never a
target: nothing before it belongs to the example, so in a packed row it must not be
predicted from the example before it. Texts are tokenised chunk by chunk (prompt, then
completion; each turn of a conversation), so every target token sits where generation
would write it.

    train, held_out = load_sft(cfg.data, tokenizer, batch_size=32, seed=0)
    batch = train.batch(k)          # batch k of the run, a pure function of (seed, k)

A batch holds B rows, right-padded to a length bucket:
    input_ids       [B, T] int32
    attention_mask  [B, T] int32   1 at real tokens
    loss_mask       [B, T] int32   1 where the token is a target
    segment_ids     [B, T] int32   packing only: 1, 2, … numbers the examples of a row, 0 = pad

With `packing`, examples are packed once (best fit, in a seeded random order) into rows of
at most max_length tokens; the model keeps them apart (see `Transformer`'s segment_ids).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
from typing import Callable, Optional

import numpy as np

from rlhf_jax.data import sources
from rlhf_jax.data.batching import BatchPlan, Batches, load_splits
from rlhf_jax.data.checks import (
    BadRow, BadRows, DataError, check_columns, check_messages, check_text, closest_layout,
)
from rlhf_jax.data.config import DataConfig, Truncation
from rlhf_jax.data.tokenize import (
    encode, render_conversation, require_chat_template, special_ids,
)

# ----------------------------------------------------------------------------- config


class SFTFormat(str, enum.Enum):
    AUTO = "auto"  # detected from the columns
    PROMPT_COMPLETION = "prompt_completion"  # prompt, completion strings
    CONVERSATIONAL = "conversational"  # messages: list of {role, content}
    TEXT = "text"  # text string, every token a target


class OverLength(str, enum.Enum):
    ERROR = "error"  # stop with a message naming the row
    DROP = "drop"  # skip it, report how many were dropped
    TRUNCATE = "truncate"  # cut the prompt (prompt_truncation side), then the end


SFT_COLUMNS = {
    SFTFormat.PROMPT_COMPLETION: ("prompt", "completion"),
    SFTFormat.CONVERSATIONAL: ("messages",),
    SFTFormat.TEXT: ("text",),
}
TARGET_COLUMN = {SFTFormat.PROMPT_COMPLETION: "completion",
                 SFTFormat.CONVERSATIONAL: "messages", SFTFormat.TEXT: "text"}
SFT_LAYOUTS = ("prompt_completion (prompt, completion as strings)",
               "conversational (messages as a list of {role, content}; loss on assistant turns)",
               "text (text as a string; loss on every token)")


@dataclasses.dataclass(frozen=True)
class SFTDataConfig(DataConfig):
    """The fields of `DataConfig` (sources, columns, max_length, buckets, on_bad_row,
    add_bos/add_eos, shuffle), with SFT's formats and packing.

    Attributes:
      format: auto (detected from the columns), prompt_completion, conversational or text.
      over_length: a row longer than max_length: error (stop, naming the row), drop (skip and
        report a count) or truncate (cut the prompt on its `prompt_truncation` side, then the
        end; a row left with no target token is a bad row).
      packing: put several examples in each row of max_length tokens; they never attend to
        each other, and positions restart at each.
    """

    format: SFTFormat = SFTFormat.AUTO
    over_length: OverLength = OverLength.TRUNCATE
    packing: bool = False


# ----------------------------------------------------------------------------- rows → chunks


def detect_sft_format(source: str, columns: list[str], fmt: SFTFormat) -> SFTFormat:
    """The layout of SFT data (checked against its columns); `fmt` unless it is auto."""
    fmt = SFTFormat(fmt)
    if fmt == SFTFormat.AUTO:
        found = [f for f, need in SFT_COLUMNS.items() if set(need) <= set(columns)]
        # else name the format that is closest to what was found
        fmt = found[0] if found else closest_layout(SFT_COLUMNS, columns)
    check_columns(source, columns, SFT_COLUMNS[fmt], SFT_LAYOUTS)
    return fmt


def conversation_chunks(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is target) pieces: each assistant turn, as the
    chat template writes it after the generation prompt, is a target; the rest is not."""
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("messages", "no assistant turn",
                     "the conversation has no assistant message to learn from")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    chunks, done = [], 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            head, reply = render_conversation(tokenizer, messages[:i], [message])
        except BadRow:
            head, reply = "", ""
        if not reply or len(head) < done or not full.startswith(head + reply):
            raise BadRow("messages", "chat template",
                         f"the chat template does not render message {i} as a continuation "
                         "of the messages before it")
        chunks += [(full[done:len(head)], False), (reply, True)]
        done = len(head) + len(reply)
    chunks.append((full[done:], False))
    return [c for c in chunks if c[0]]


def row_chunks(row: dict, fmt: SFTFormat, tokenizer) -> list[tuple[str, bool]]:
    """(text, is target) pieces of one row, checked; raises `BadRow`."""
    if fmt == SFTFormat.PROMPT_COMPLETION:
        prompt = check_text(row["prompt"], "prompt", allow_empty=True)
        return [(prompt, False), (check_text(row["completion"], "completion"), True)]
    if fmt == SFTFormat.TEXT:
        return [(check_text(row["text"], "text"), True)]
    return conversation_chunks(check_messages(row["messages"], "messages"), tokenizer)


# ----------------------------------------------------------------------------- chunks → tokens


def assemble(
    pieces: list[list[int]], targets: list[bool], bos: Optional[int], eos: Optional[int]
) -> tuple[np.ndarray, np.ndarray]:
    """`[BOS] pieces… [EOS]` and its loss mask (int32 each).

    BOS (EOS) is not added again when the text already starts (ends) with it, as chat
    templates often render them. EOS is a target when it ends a target piece. The first
    token is never a target.
    """
    ids = [t for p in pieces for t in p]
    mask = [int(tg) for p, tg in zip(pieces, targets) for _ in p]
    if bos is not None and ids[:1] != [bos]:
        ids, mask = [bos] + ids, [0] + mask
    if eos is not None and ids[-1:] != [eos]:
        ids, mask = ids + [eos], mask + [mask[-1] if mask else 0]
    if mask:
        mask[0] = 0
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def truncate_example(
    ids: np.ndarray, mask: np.ndarray, max_length: int, side: Truncation, bos: Optional[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Cuts an over-long example to `max_length`: first its prompt (the tokens before the
    first target, BOS kept) on `side`, then its end."""
    excess = len(ids) - max_length
    head = 1 if bos is not None and ids[:1].tolist() == [bos] else 0
    first_target = int(np.argmax(mask)) if mask.any() else len(mask)
    cut = min(excess, max(first_target - head, 0))
    if cut and Truncation(side) != Truncation.NONE:
        start = head if Truncation(side) == Truncation.LEFT else first_target - cut
        keep = np.r_[0:start, start + cut:len(ids)]
        ids, mask = ids[keep], mask[keep]
    ids, mask = ids[:max_length], mask[:max_length].copy()
    mask[0] = 0  # a cut may have made a target the first token
    return ids, mask


@dataclasses.dataclass
class Examples:
    """Token sequences with their loss masks (not padded) and the source row of each."""

    ids: list[np.ndarray]
    loss_mask: list[np.ndarray]
    row: np.ndarray  # [N] int64

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray([len(x) for x in self.ids], np.int64)


def encode_examples(
    data: dict[str, list], fmt: SFTFormat, row_ids: list[int], tokenizer, cfg: SFTDataConfig,
    bad: BadRows, source: str,
) -> tuple[Examples, dict[str, int]]:
    """Checks and tokenises every row (one batched tokenizer call); returns the examples
    and counts of over-length rows {"dropped": n, "truncated": n}."""
    bos, eos, _ = special_ids(tokenizer, cfg.add_bos, cfg.add_eos)
    chunks: dict[int, list[tuple[str, bool]]] = {}
    for i, row_id in enumerate(row_ids):
        try:
            chunks[i] = row_chunks({name: values[i] for name, values in data.items()}, fmt,
                                   tokenizer)
        except BadRow as e:
            bad.report(row_id, e)
    flat = encode(tokenizer, [text for c in chunks.values() for text, _ in c])
    ids_out, masks_out, rows, at = [], [], [], 0
    counts = {"dropped": 0, "truncated": 0}
    for i, pieces in chunks.items():
        ids, mask = assemble(flat[at:at + len(pieces)], [t for _, t in pieces], bos, eos)
        at += len(pieces)
        if len(ids) > cfg.max_length:
            column = TARGET_COLUMN[fmt]
            if cfg.over_length == OverLength.ERROR:
                raise DataError(
                    f"{source}: row {row_ids[i]}, column '{column}': the example is {len(ids)} "
                    f"tokens with BOS/EOS, over data.max_length={cfg.max_length}; set "
                    "data.over_length=truncate or drop, or raise data.max_length")
            if cfg.over_length == OverLength.DROP:
                counts["dropped"] += 1
                continue
            ids, mask = truncate_example(ids, mask, cfg.max_length, cfg.prompt_truncation, bos)
            if not mask.any():
                bad.report(row_ids[i], BadRow(
                    column, "no target left after truncation",
                    f"after truncation to data.max_length={cfg.max_length} no target token is "
                    "left; raise max_length or set data.over_length=drop"))
                continue
            counts["truncated"] += 1
        ids_out.append(ids)
        masks_out.append(mask)
        rows.append(row_ids[i])
    return Examples(ids_out, masks_out, np.asarray(rows, np.int64)), counts


# ----------------------------------------------------------------------------- packing & batches


def pack(lengths: np.ndarray, capacity: int, seed: int) -> list[list[int]]:
    """Example indices of each packed row of at most `capacity` tokens: each example, in a
    seeded random order, goes to the open row it fills best (a new row when none has room)."""
    order = np.random.default_rng([seed, 0xBAC]).permutation(len(lengths))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row), sorted
    for i in order.tolist():
        need = int(lengths[i])
        k = bisect.bisect_left(room, (need, -1))
        if k == len(room):
            rows.append([i])
            left, r = capacity - need, len(rows) - 1
        else:
            left, r = room.pop(k)
            rows[r].append(i)
            left -= need
        if left > 0:
            bisect.insort(room, (left, r))
    return rows


class SFTData(Batches):
    """One split's examples on this host, served as fixed-shape batches (see the module doc).

    Args:
      examples: the tokenised examples.
      rows: with packing, the examples of each packed row; None = one example per row.
      plan: batch plan over the rows.
      pad_id: id at padded slots.
      summary: one line on what was loaded, dropped and truncated.
    """

    def __init__(self, examples: Examples, rows: Optional[list[list[int]]], plan: BatchPlan,
                 pad_id: int, summary: str):
        self.examples, self.rows, self.plan = examples, rows, plan
        self.pad_id, self.summary = pad_id, summary

    def __len__(self) -> int:
        return len(self.examples.ids)

    def collate(self, items: np.ndarray, length: int) -> dict[str, np.ndarray]:
        shape = (len(items), length)
        ids = np.full(shape, self.pad_id, np.int32)
        loss_mask, segment_ids = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        for b, item in enumerate(items):
            if item < 0:  # an empty slot
                continue
            t = 0
            members = [item] if self.rows is None else self.rows[item]
            for segment, e in enumerate(members, 1):
                n = len(self.examples.ids[e])
                ids[b, t:t + n] = self.examples.ids[e]
                loss_mask[b, t:t + n] = self.examples.loss_mask[e]
                segment_ids[b, t:t + n] = segment
                t += n
        batch = {"input_ids": ids, "attention_mask": (segment_ids > 0).astype(np.int32),
                 "loss_mask": loss_mask}
        if self.rows is not None:
            batch["segment_ids"] = segment_ids
        return batch


# ----------------------------------------------------------------------------- loading


def examples_of(ds, cfg: SFTDataConfig, tokenizer, source: str) -> tuple[Examples, str]:
    """Checked, tokenised examples of a loaded dataset (with rows), and a one-line report."""
    ds = sources.rename_columns(ds, cfg.columns, source)
    columns = [c for c in ds.column_names if c != sources.ROW]
    fmt = detect_sft_format(source, columns, cfg.format)
    if fmt == SFTFormat.CONVERSATIONAL:
        require_chat_template(tokenizer, source, "give prompt/completion strings")
    data = ds.select_columns([*SFT_COLUMNS[fmt], sources.ROW]).to_dict()
    row_ids = data.pop(sources.ROW)
    bad = BadRows(cfg.on_bad_row, source)
    examples, counts = encode_examples(data, fmt, row_ids, tokenizer, cfg, bad, source)
    dropped = len(bad.rows) + counts["dropped"]
    why = [f"{n} {reason}" for reason, n in bad.counts.most_common()]
    why += [f"{counts['dropped']} over-length"] if counts["dropped"] else []
    kept = f"dropped {dropped} of {len(ds)} rows ({', '.join(why)})" if dropped else \
        f"{len(ds)} rows, none dropped"
    if not examples.ids:
        raise DataError(f"{source}: {kept}: no examples are left; set data.on_bad_row=error and "
                        "data.over_length=error to stop at the first bad row and see why")
    targets = sum(int(m.sum()) for m in examples.loss_mask)
    truncated = f", {counts['truncated']} truncated" if counts["truncated"] else ""
    return examples, (f"{source}: {kept}{truncated}; {fmt.value} format, {len(examples.ids)} "
                      f"examples, {int(examples.lengths.sum())} tokens ({targets} targets)")


def load_sft(
    cfg: SFTDataConfig,
    tokenizer,
    batch_size: int,
    seed: int,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    agree: Optional[Callable] = None,
) -> tuple[SFTData, Optional[SFTData]]:
    """(train, held-out or None) for this host.

    Args:
      cfg: the data section (sources, format, checks, lengths, buckets, packing).
      tokenizer: a Hugging Face tokenizer (its chat template renders conversations).
      batch_size: rows per global batch; each of `process_count` hosts serves its share.
      seed: seed of the held-out split, the packing and the shuffle.
      process_index, process_count: this host's slice (default: from jax).
      agree: how hosts agree on batch shapes (default: an all-gather; for tests).
    """
    _, _, pad = special_ids(tokenizer, cfg.add_bos, cfg.add_eos)

    def make(ds, name: str, plan: Callable[..., BatchPlan]) -> SFTData:
        examples, summary = examples_of(ds, cfg, tokenizer, name)
        rows, lengths = None, examples.lengths
        if cfg.packing:
            rows = pack(lengths, cfg.max_length, seed)
            lengths = np.asarray([lengths[r].sum() for r in rows], np.int64)
            summary += (f"; packed into {len(rows)} rows, "
                        f"{lengths.sum() / (len(rows) * cfg.max_length):.0%} full")
        return SFTData(examples, rows, plan(lengths, None), pad, summary)

    return load_splits(cfg, seed, batch_size, make, process_index, process_count, agree)
