"""Metrics out of a training loop: JSONL (always), TensorBoard (when available), console.

    logger = MetricsLogger(out_dir, resume_step=start)
    logger.log(step, {"train/loss": 0.31, "perf/tokens_per_s": 1.2e4})
    logger.close()

`metrics.jsonl` holds one `{"step": n, ...}` object per `log` call, in order. A resumed run
passes the step it resumed from: rows logged after that step by the interrupted run are
dropped, so the file reads as if the run had never stopped (and TensorBoard is told to hide
the interrupted run's events past that step); a fresh run starts both records afresh. Values
are floats; NaN and inf are written as the strings "nan" / "inf" / "-inf" so every row stays valid JSON.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Optional

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _number(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_jsonl(path: str) -> list[dict]:
    """The rows of a metrics file; "nan"/"inf" strings come back as floats."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            rows.append({k: float(v) if isinstance(v, str) and k != "step" else v
                         for k, v in row.items()})
    return rows


def drop_rows_after(path: str, step: int, key: str = "step") -> None:
    """Rewrites the JSONL file `path` without the rows whose `key` is above `step`.

    A resumed run calls it on the files its interrupted run wrote past the checkpoint it
    resumes from (metrics.jsonl keyed by "step", PPO's samples.jsonl by "iteration"), so each
    file reads as if the run had never stopped. A line torn by a hard kill mid-write is dropped
    too; a row without `key` is kept; a missing file is left missing.
    """
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # cut off by a hard kill mid-write
                continue
            if not isinstance(row, dict) or row.get(key, 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def _remove_event_files(directory: str) -> None:
    """Removes the TensorBoard event files of an earlier run (TensorBoard reads every file in
    the directory, so a rerun would show both runs' curves on one chart)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if name.startswith("events.out.tfevents") and os.path.isfile(path):
            os.remove(path)


def _summary_writer(summary_writer, directory: str, resume_step: Optional[int]):
    """A resumed run's writer: its first event tells TensorBoard to hide what the interrupted
    run logged after the checkpoint (as drop_rows_after does for the JSONL rows), and its file
    name says so, which also keeps it apart from a file started in the same second (event
    files are named by the second)."""
    if resume_step is None:
        return summary_writer(directory)
    return summary_writer(directory, purge_step=resume_step + 1,
                          filename_suffix=f".resumed_after_{resume_step}")


class MetricsLogger:
    """Writes metrics to out_dir/metrics.jsonl and TensorBoard event files.

    Args:
      out_dir: the run's output directory.
      resume_step: the step a resumed run starts after (rows beyond it are dropped, earlier
        TensorBoard events kept); None for a fresh run, which starts a new metrics file and
        removes the TensorBoard event files of an earlier run in the same directory.
      tensorboard: also write TensorBoard events to out_dir/tensorboard (skipped, with no
        error, when tensorboardX is not installed).
      enabled: False on every host but the first, so that one file is written per run.
    """

    def __init__(self, out_dir: str, resume_step: Optional[int] = None, tensorboard: bool = True,
                 enabled: bool = True):
        self.path = os.path.join(out_dir, METRICS_FILE)
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        events = os.path.join(out_dir, TENSORBOARD_DIR)
        if resume_step is not None:
            drop_rows_after(self.path, resume_step)
        else:  # a fresh run starts both records afresh, or a reader sees two runs in one
            if os.path.exists(self.path):
                os.remove(self.path)
            _remove_event_files(events)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                pass
            else:
                self._writer = _summary_writer(SummaryWriter, events, resume_step)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One row: `metrics` (scalars) at `step`."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _number(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._writer is not None:
            for k, v in metrics.items():
                self._writer.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_table(rows: Iterable[Mapping[str, Any]], columns: Optional[list[str]] = None,
                 width: int = 60) -> str:
    """A Markdown table of `rows`; long cells are cut to `width` characters, `|` escaped."""
    rows = list(rows)
    columns = columns or list(rows[0]) if rows else columns or []

    def cell(v: Any) -> str:
        if isinstance(v, float):
            text = f"{v:.4g}"
        else:
            text = str(v).replace("\n", " ⏎ ")
        text = text.replace("|", "\\|")
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
