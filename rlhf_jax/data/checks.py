"""How every loader checks rows and columns, and reports what it finds.

A problem with a whole source (unreadable, no rows, a missing column) is a `DataError`: one
line naming the source and the fix. A problem with one row is a `BadRow`, which `BadRows`
turns into a `DataError` naming the row and column (on_bad_row=error) or a dropped-row
count (drop), so nothing fails later inside jit.
"""

from __future__ import annotations

import collections
import difflib
from typing import Any, Mapping, Optional, Sequence, TypeVar

from rlhf_jax.data.config import OnBadRow

Layout = TypeVar("Layout")


class DataError(ValueError):
    """A problem with the data; the message names the source, row and column."""


class BadRow(Exception):
    """Raised inside row parsing; `BadRows` turns it into an error or a dropped-row count."""

    def __init__(self, column: str, reason: str, detail: str):
        super().__init__(detail)
        self.column, self.reason, self.detail = column, reason, detail


class BadRows:
    """Raises on the first bad row (on_bad_row=error) or counts bad rows by reason (drop)."""

    def __init__(self, on_bad_row: OnBadRow, source: str):
        self.on_bad_row = OnBadRow(on_bad_row)
        self.source = source
        self.counts: collections.Counter = collections.Counter()
        self.rows: set[int] = set()

    def report(self, row: int, bad: BadRow) -> None:
        if self.on_bad_row == OnBadRow.ERROR:
            raise DataError(
                f"{self.source}: row {row}, column '{bad.column}': {bad.detail} "
                f"(set data.on_bad_row=drop to skip such rows)"
            )
        if row not in self.rows:
            self.counts[bad.reason] += 1
            self.rows.add(row)

    def summary(self, total: int) -> str:
        if not self.rows:
            return f"{self.source}: {total} rows, none dropped"
        why = ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())
        return f"{self.source}: dropped {len(self.rows)} of {total} rows ({why})"


# ----------------------------------------------------------------------------- values


def check_text(value: Any, column: str, allow_empty: bool = False) -> str:
    """`value` if it is a string (non-blank unless `allow_empty`); raises `BadRow`."""
    if not isinstance(value, str):
        raise BadRow(column, "non-string text",
                     f"expected a string, got {type(value).__name__} ({value!r:.60})")
    if not allow_empty and not value.strip():
        raise BadRow(column, "empty text", "the text is empty")
    return value


def check_messages(value: Any, column: str) -> list[dict]:
    """`value` as a non-empty list of {role, content} string messages with non-blank
    content (other keys dropped); raises `BadRow`."""
    if not isinstance(value, list) or not value:
        raise BadRow(column, "bad messages",
                     f"expected a non-empty list of {{role, content}} messages, got {value!r:.60}")
    for j, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise BadRow(column, "bad messages",
                         f"message {j} must be {{'role': str, 'content': str}}, got {m!r:.80}")
        if not m["content"].strip():
            raise BadRow(column, "empty text", f"message {j} has empty content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


# ----------------------------------------------------------------------------- columns


def closest_name(name: str, found: Sequence[str]) -> Optional[str]:
    """The name in `found` that `name` was most likely meant to be, or None."""
    close = difflib.get_close_matches(name, list(found), n=1, cutoff=0.6)
    return close[0] if close else None


def closest_layout(required: Mapping[Layout, Sequence[str]], columns: Sequence[str]) -> Layout:
    """The layout whose required columns are closest to `columns`: the fewest missing, then
    the most required (so the error names what the data most likely meant to be)."""
    cols = set(columns)
    return min(required, key=lambda f: len(set(required[f]) - cols) - 0.1 * len(required[f]))


def check_columns(source: str, columns: Sequence[str], need: Sequence[str],
                  layouts: Sequence[str]) -> None:
    """Raises a `DataError` naming each column of `need` missing from `columns`, the found
    column it was likely meant to be, and the accepted `layouts`."""
    missing = [c for c in need if c not in columns]
    if not missing:
        return
    others = [c for c in columns if c not in need]
    hints = []
    for name in missing:
        close = closest_name(name, others)
        hints.append(f"column '{name}' is missing" + (
            f"; did you mean '{close}'? (rename it, or set data.columns.{name}={close})"
            if close else ""))
    raise DataError(f"{source}: {'; '.join(hints)}. Found columns {list(columns)}; "
                    f"accepted formats: {'; '.join(layouts)}")
