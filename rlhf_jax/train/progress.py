"""Progress of a long loop: a live bar on a terminal, plain periodic lines in a log file.

    with progress(total, initial=start, desc="sft") as bar:
        for k in ...:
            bar.update(1)
            bar.set_postfix({"loss": 0.512})

A bar redraws itself with carriage returns, which a redirected log (`> run.log`, a cluster's
job output) keeps as one endless line of overwritten updates. So a bar is drawn only when the
stream is a terminal; otherwise the same progress comes as whole lines: the first update, then
at most one line every `every_s` seconds, and the last one, e.g.

    sft: 40/200 steps (20%), 3.1 steps/s, loss 0.512
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any, Iterator, Mapping, Optional, TextIO


class Progress:
    """Plain-line progress for a stream that is not a terminal.

    Arguments as for `progress`, and `clock`: the time in seconds (a test passes its own).
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str = "", unit: str = "step",
                 stream: Optional[TextIO] = None, every_s: float = 10.0, clock=time.monotonic):
        self.total, self.n = total, initial
        self.desc, self.unit, self.every_s = desc, unit, every_s
        self.stream = sys.stderr if stream is None else stream
        self._clock = clock
        self._postfix = ""
        self._last_n, self._last_t = initial, clock()  # what the previous line reported
        self._printed: Optional[tuple[int, str]] = None

    def update(self, n: int = 1) -> None:
        """Counts `n` more units done; prints a line on the first update and then at most
        once every `every_s` seconds."""
        self.n += n
        if self._printed is None or self._clock() - self._last_t >= self.every_s:
            self._print()

    def set_postfix(self, values: Mapping[str, Any]) -> None:
        """Values shown after the count on the next line (numbers compactly, strings as they are)."""
        self._postfix = ", ".join(f"{k} {_compact(v)}" for k, v in values.items())

    def close(self) -> None:
        """Prints the last state, unless the previous line already showed it."""
        if self._printed is not None and self._printed != (self.n, self._postfix):
            self._print()

    def line(self) -> str:
        """The line that describes the progress now."""
        now = self._clock()
        parts = [f"{self.n}/{self.total} {_plural(self.unit)}"]
        if self.total > 0:
            parts[0] += f" ({100 * self.n // self.total}%)"
        elapsed, done = now - self._last_t, self.n - self._last_n
        if done > 0 and elapsed > 0:
            rate = done / elapsed  # over the time since the previous line: the current speed
            parts.append(f"{rate:.3g} {_plural(self.unit)}/s" if rate >= 1
                         else f"{1 / rate:.3g} s/{self.unit}")
        if self._postfix:
            parts.append(self._postfix)
        text = ", ".join(parts)
        return f"{self.desc}: {text}" if self.desc else text

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._printed = (self.n, self._postfix)
        self._last_n, self._last_t = self.n, self._clock()


class _Bar:
    """A tqdm bar behind the `Progress` interface, for a terminal."""

    def __init__(self, bar):
        self._bar = bar

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, values: Mapping[str, Any]) -> None:
        self._bar.set_postfix({k: _compact(v) for k, v in values.items()})


@contextlib.contextmanager
def progress(total: int, *, initial: int = 0, desc: str = "", unit: str = "step",
             stream: Optional[TextIO] = None, every_s: float = 10.0) -> Iterator[Progress]:
    """Reports the progress of a loop of `total` units on `stream` (default: standard error).

    Args:
      total: units in the whole loop.
      initial: units already done (a resumed run).
      desc: what is progressing, put first on the line.
      unit: the name of one unit ("step", "it", "batch").
      stream: where to write; a tqdm bar when it is a terminal, plain lines otherwise.
      every_s: at most one plain line per this many seconds between the first and the last.
    Yields:
      an object with `update(n)` and `set_postfix(values)`.
    """
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        from tqdm import tqdm

        with tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream) as bar:
            yield _Bar(bar)
        return
    plain = Progress(total, initial=initial, desc=desc, unit=unit, stream=stream, every_s=every_s)
    try:
        yield plain
    finally:
        plain.close()


def log_line(message: str) -> None:
    """Prints a log line on standard output without breaking a progress bar on the terminal."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stdout)


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")
