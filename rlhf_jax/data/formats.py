"""Preference rows in the layouts people have → (prompt, chosen, rejected) text pairs.

Accepted layouts (`Format`):
  explicit        prompt, chosen, rejected: strings
  implicit        chosen, rejected: full texts that share the prompt as a prefix (Anthropic
                  HH style); split after the last shared "Assistant:" turn marker, else at the
                  last shared word boundary
  conversational  chosen, rejected: lists of {"role", "content"} messages, optional prompt
                  list; rendered with the tokenizer's chat template
  rankings        prompt, responses [K], ranks [K] (1 = best): all K(K-1)/2 pairs, kept in
                  one batch by their group id (InstructGPT)
An optional numeric `margin` column gives each pair a margin (Llama 2); rankings have none.

Every row is checked before anything is tokenised: a bad one raises `DataError` naming its
row and column, or is dropped and counted (`BadRows`), so nothing fails later inside jit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

from rlhf_jax.data.checks import (
    BadRow, BadRows, check_columns, check_messages, check_text, closest_layout,
)
from rlhf_jax.data.config import Format
from rlhf_jax.data.tokenize import render_conversation

PREFERENCE_COLUMNS = {
    Format.EXPLICIT: ("prompt", "chosen", "rejected"),
    Format.IMPLICIT: ("chosen", "rejected"),
    Format.CONVERSATIONAL: ("chosen", "rejected"),
    Format.RANKINGS: ("prompt", "responses", "ranks"),
}
PREFERENCE_LAYOUTS = (
    "explicit (prompt, chosen, rejected as strings)",
    "implicit (chosen, rejected as full texts sharing the prompt)",
    "conversational (chosen, rejected as lists of {role, content} messages; optional prompt)",
    "rankings (prompt, responses as a list of strings, ranks as a list of numbers, 1 = best)",
)
_TURN = re.compile(r"(?:^|\n)[ \t]*assistant[ \t]*:", re.IGNORECASE)


@dataclasses.dataclass
class TextPairs:
    """Preference pairs as texts, one entry per pair; `group` is the source row of each."""

    prompt: list[str]
    chosen: list[str]
    rejected: list[str]
    margin: list[float]
    group: list[int]

    @classmethod
    def empty(cls) -> "TextPairs":
        return cls([], [], [], [], [])

    def add(self, prompt: str, chosen: str, rejected: str, margin: float, group: int) -> None:
        self.prompt.append(prompt)
        self.chosen.append(chosen)
        self.rejected.append(rejected)
        self.margin.append(margin)
        self.group.append(group)

    def __len__(self) -> int:
        return len(self.prompt)


# ----------------------------------------------------------------------------- columns


def detect_preference_format(
    source: str, columns: Sequence[str], first_row: dict, fmt: Format
) -> Format:
    """The layout of preference data (checked against its columns); `fmt` unless it is auto."""
    fmt = Format(fmt)
    if fmt == Format.AUTO:
        cols = set(columns)
        if {"responses", "ranks"} <= cols:
            fmt = Format.RANKINGS
        elif {"chosen", "rejected"} <= cols:
            if isinstance(first_row.get("chosen"), list):
                fmt = Format.CONVERSATIONAL
            else:
                fmt = Format.EXPLICIT if "prompt" in cols else Format.IMPLICIT
        else:  # name the format that is closest to what was found
            fmt = closest_layout(PREFERENCE_COLUMNS, columns)
    check_columns(source, columns, PREFERENCE_COLUMNS[fmt], PREFERENCE_LAYOUTS)
    return fmt


# ----------------------------------------------------------------------------- values


def _margin(value: Any) -> float:
    if isinstance(value, str):  # CSV columns are read as text; an empty field is no margin
        try:
            value = float(value) if value.strip() else None
        except ValueError:
            pass
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRow("margin", "bad margin", f"expected a finite number, got {value!r:.60}")
    return float(value)


def _different(chosen: str, rejected: str, column: str = "rejected") -> None:
    if chosen == rejected:
        raise BadRow(column, "identical chosen and rejected",
                     "chosen and rejected are identical, so the pair teaches nothing")


def split_common_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two full texts sharing a prompt.

    The cut goes after the last "Assistant:" turn marker both share, else before the first
    word where they differ; the whitespace before a response stays with the response.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    common = chosen[:n]
    turns = list(_TURN.finditer(common))
    if turns:
        cut = turns[-1].end()
    else:
        cut = n
        while cut > 0 and not common[cut - 1].isspace():  # back to the start of the word
            cut -= 1
        while cut > 0 and common[cut - 1].isspace():  # and before the space
            cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


# ----------------------------------------------------------------------------- rows → pairs


def _explicit(row: dict, out: TextPairs, group: int) -> None:
    prompt = check_text(row["prompt"], "prompt", allow_empty=True)
    chosen = check_text(row["chosen"], "chosen")
    rejected = check_text(row["rejected"], "rejected")
    _different(chosen, rejected)
    out.add(prompt, chosen, rejected, _margin(row.get("margin")), group)


def _implicit(row: dict, out: TextPairs, group: int) -> None:
    chosen = check_text(row["chosen"], "chosen")
    rejected = check_text(row["rejected"], "rejected")
    _different(chosen, rejected)
    prompt, c, r = split_common_prefix(chosen, rejected)
    if not c.strip() or not r.strip():
        raise BadRow("chosen", "no response after the prompt",
                     "chosen and rejected do not split into a shared prompt and two responses")
    out.add(prompt, c, r, _margin(row.get("margin")), group)


def _conversational(row: dict, out: TextPairs, group: int, tokenizer) -> None:
    chosen = check_messages(row["chosen"], "chosen")
    rejected = check_messages(row["rejected"], "rejected")
    _different(chosen, rejected)
    prompt = row.get("prompt")
    if prompt is None:  # the shared leading messages are the prompt
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        prompt = chosen[:n]
    elif isinstance(prompt, str):  # a plain-text prompt is one user message
        prompt = [{"role": "user", "content": check_text(prompt, "prompt")}]
    else:
        prompt = check_messages(prompt, "prompt")
    chosen = chosen[len(prompt):] if chosen[:len(prompt)] == prompt else chosen
    rejected = rejected[len(prompt):] if rejected[:len(prompt)] == prompt else rejected
    if not chosen or not rejected:
        raise BadRow("chosen", "no response after the prompt",
                     "chosen and rejected have no messages beyond the prompt")
    head, c = render_conversation(tokenizer, prompt, chosen, "chosen")
    head_r, r = render_conversation(tokenizer, prompt, rejected, "rejected")
    assert head == head_r
    out.add(head, c, r, _margin(row.get("margin")), group)


def _rankings(row: dict, out: TextPairs, group: int) -> None:
    prompt = check_text(row["prompt"], "prompt", allow_empty=True)
    responses, ranks = row["responses"], row["ranks"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise BadRow("responses", "bad rankings",
                     f"expected a list of 2 or more responses, got {responses!r:.60}")
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise BadRow("ranks", "bad rankings",
                     f"expected a list of {len(responses)} ranks (one per response), "
                     f"got {ranks!r:.60}")
    texts = [check_text(t, f"responses[{k}]") for k, t in enumerate(responses)]
    for k, rank in enumerate(ranks):
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not math.isfinite(rank):
            raise BadRow("ranks", "bad rankings", f"rank {k} must be a number, got {rank!r:.60}")
    if len(set(ranks)) != len(ranks):
        raise BadRow("ranks", "bad rankings",
                     f"ranks {ranks} have ties; give each response its own rank")
    if len(set(texts)) != len(texts):
        raise BadRow("responses", "identical chosen and rejected", "two responses are identical")
    order = np.argsort(np.asarray(ranks, dtype=np.float64), kind="stable")  # best first
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            out.add(prompt, texts[order[a]], texts[order[b]], 0.0, group)


def rows_to_pairs(
    columns: dict[str, list], fmt: Format, row_ids: Sequence[int], bad: BadRows, tokenizer=None
) -> TextPairs:
    """Checks every row and expands it into pairs; columns hold the data column by column."""
    out = TextPairs.empty()
    names = list(columns)
    for i, row_id in enumerate(row_ids):
        row = {name: columns[name][i] for name in names}
        size = len(out)
        try:
            if fmt == Format.EXPLICIT:
                _explicit(row, out, row_id)
            elif fmt == Format.IMPLICIT:
                _implicit(row, out, row_id)
            elif fmt == Format.CONVERSATIONAL:
                _conversational(row, out, row_id, tokenizer)
            else:
                _rankings(row, out, row_id)
        except BadRow as e:
            for field in dataclasses.fields(out):  # undo a partly added row
                del getattr(out, field.name)[size:]
            bad.report(row_id, e)
    return out
