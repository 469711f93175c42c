"""Rows from wherever they are, through `datasets`: local files, `save_to_disk` directories,
or the Hugging Face Hub (tried only when no local path of that name exists).

Every loaded dataset gets a `ROW` column with each row's index in its source, so that a
message about a bad row names the row the user can find, after any split or host slice.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import json
import os
from typing import Optional

import numpy as np

from rlhf_jax.data.checks import DataError

ROW = "_row"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                 ".arrow": "arrow"}
FIX = {  # how to write a file of each kind so that it reads
    "json": "write one JSON object per line (.jsonl) or one JSON array of objects (.json)",
    "csv": "write UTF-8 CSV with a header row of column names",
    "parquet": "write it with pandas' DataFrame.to_parquet or datasets' Dataset.to_parquet",
    "arrow": "write it with datasets' Dataset.save_to_disk and give that directory",
}
# What `datasets` says when files parse to no rows (a CSV header only, an empty JSON array).
_NO_DATA = "corresponds to no data"


@contextlib.contextmanager
def _quiet():
    """No `datasets` progress bars or log lines while loading: a file it cannot read becomes
    our one-line `DataError`, not its log output plus ours."""
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    level = ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 10)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if was_enabled:
            ds_logging.enable_progress_bar()


def _reason(error: BaseException) -> str:
    """'Type: first line' of the innermost cause (`datasets` wraps the reader's error)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


def _has_text(path: str) -> bool:
    """False for a file of nothing but whitespace (after a UTF-8 BOM); reads only as far as
    the first other byte."""
    with open(path, "rb") as f:
        chunk = f.read(1 << 16).removeprefix(codecs.BOM_UTF8)
        while chunk:
            if chunk.strip():
                return True
            chunk = f.read(1 << 16)
    return False


def _not_utf8(path: str) -> Optional[str]:
    """Why a text file is not UTF-8, or None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with open(path, "rb") as f:
        try:
            while chunk := f.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            return f"is not UTF-8 text (byte 0x{e.object[e.start]:02x}: {e.reason})"
    return None


def _json_problem(path: str) -> Optional[str]:
    """Why a .json/.jsonl file is not JSON objects, one per line or in one array, or None."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON document
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return f"is not valid JSON ({e.msg}, line {e.lineno}, column {e.colno})"
        kinds = {type(r).__name__ for r in rows if not isinstance(r, dict)}
        return f"is a JSON array of {', '.join(sorted(kinds))}, not of objects" if kinds else None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            return f"line {n} is not valid JSON ({e.msg}, column {e.colno})"
        if not isinstance(row, dict):
            return f"line {n} is a {type(row).__name__}, not a JSON object of columns"
    return None


def _unreadable(source: str, builder: str, files: list[str], error: Exception) -> DataError:
    """The one-line error for files `datasets` could not read: the first file whose problem
    we can name (not UTF-8, not JSON objects), else the reader's own reason."""
    if _NO_DATA in str(error):
        return DataError(f"{source}: no rows (a header or an empty array only); {FIX[builder]}")
    for f in files:
        why = None
        if builder in ("json", "csv"):
            why = _not_utf8(f)
        if why is None and builder == "json":
            why = _json_problem(f)
        if why:
            return DataError(f"{f}: {why}; {FIX[builder]}")
    return DataError(f"{source}: could not be read as {builder} ({_reason(error)}); "
                     f"{FIX[builder]}")


def _builder(source: str, files: list[str]) -> str:
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if len(exts) != 1 or next(iter(exts)) not in FILE_BUILDERS:
        raise DataError(
            f"{source}: cannot tell how to read files with extensions {sorted(exts)}; use "
            f"{', '.join(FILE_BUILDERS)} files, a save_to_disk directory, or a hub name"
        )
    return FILE_BUILDERS[exts.pop()]


def _csv_as_text(path: str) -> dict:
    """`load_dataset` options that read every column of a CSV file as the text it holds:
    "007" stays "007" and "NA" stays "NA" (CSV has no types; pandas would guess them)."""
    import csv

    import datasets

    with open(path, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader(f), [])
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "na_filter": False}


def _from_files(source: str, files: list[str]):
    import datasets

    builder = _builder(source, files)
    for f in files:
        try:
            empty = not _has_text(f)
        except OSError as e:
            raise DataError(f"{f}: cannot be read ({e.strerror})") from None
        if empty:
            raise DataError(f"{f}: no rows (the file is empty or holds only blank lines); "
                            f"{FIX[builder]}")
    try:
        options = _csv_as_text(files[0]) if builder == "csv" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", **options)
    except Exception as e:  # noqa: BLE001 - any reader's failure means a malformed file
        raise _unreadable(source, builder, files, e) from None


def _from_dir(path: str, split: str):
    try:
        return _load_dir(path, split)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged save or unreadable data files
        raise DataError(f"{path}: could not be read as a save_to_disk directory or a folder of "
                        f"data files ({_reason(e)}); give one data file or a glob "
                        "instead") from None


def _load_dir(path: str, split: str):
    import datasets

    if os.path.exists(os.path.join(path, "dataset_dict.json")):
        splits = datasets.load_from_disk(path)
        if split not in splits:
            raise DataError(f"{path}: no split '{split}'; it has {list(splits)} "
                            "(set data.train_split / data.eval_split)")
        return splits[split]
    if os.path.exists(os.path.join(path, "state.json")):
        return datasets.load_from_disk(path)
    return datasets.load_dataset(path, split=split)  # a folder of data files


def _from_hub(name: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any failure here means "not loadable"
        raise DataError(
            f"{name!r} is not a local file or directory, and loading it from the Hugging Face "
            f"Hub failed ({_reason(e)}). Offline? Give a "
            "local .jsonl/.json/.csv/.parquet file or a save_to_disk directory instead."
        ) from None


def _looks_local(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or os.path.splitext(source)[1].lower() in FILE_BUILDERS)


def load_rows(source: str, split: str = "train"):
    """A `datasets.Dataset` of `source`, with the `ROW` column added.

    Args:
      source: a .json/.jsonl/.csv/.parquet/.arrow file or glob, a `save_to_disk` directory
        (a Dataset or a DatasetDict), a directory of data files, or a hub name.
      split: the split of a DatasetDict directory or hub dataset (files have only one).

    Raises:
      DataError: one line naming the file and the fix, for a source that is missing, empty,
        or cannot be read.
    """
    path = os.path.expanduser(source)
    files = []
    if glob.has_magic(path):
        files = sorted(f for f in glob.glob(path) if os.path.isfile(f))
    with _quiet():
        if os.path.isdir(path):
            ds = _from_dir(path, split)
        elif os.path.isfile(path) or files:
            ds = _from_files(source, files or [path])
        elif _looks_local(source):
            raise DataError(f"{source}: no such file or directory")
        else:
            ds = _from_hub(source, split)
    if ROW in ds.column_names:
        ds = ds.remove_columns(ROW)
    return ds.add_column(ROW, np.arange(len(ds), dtype=np.int64))


def rename_columns(ds, columns: dict[str, str], source: str):
    """`ds` with the data's column names mapped to ours (`columns`: ours → theirs)."""
    found = ds.column_names
    for ours, theirs in columns.items():
        if theirs not in found:
            raise DataError(f"{source}: data.columns.{ours}={theirs!r} names no column; found "
                            f"{[c for c in found if c != ROW]}")
    return ds.rename_columns({theirs: ours for ours, theirs in columns.items() if theirs != ours})


def hold_out(ds, fraction: float, seed: int, source: str = "the data"):
    """(train, held-out) split of `ds`, the same on every host for a seed."""
    if not 0 < fraction < 1 or len(ds) < 2:
        raise DataError(f"{source}: cannot hold out {fraction:g} of {len(ds)} rows; holding out "
                        "needs 2 or more rows and a fraction in (0, 1)")
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(ds))
    n_held = min(max(1, round(fraction * len(ds))), len(ds) - 1)
    return ds.select(np.sort(order[n_held:])), ds.select(np.sort(order[:n_held]))


def host_slice(ds, index: Optional[int] = None, count: Optional[int] = None):
    """This host's contiguous share of `ds` (`jax.process_index()` of `jax.process_count()`)."""
    import jax

    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if count == 1:
        return ds
    return ds.shard(num_shards=count, index=index, contiguous=True)


def train_and_eval(cfg, seed: int):
    """(training rows, held-out rows or None, the held-out split's name) of a data config
    with `train`/`train_split`, `eval`/`eval_split` and `eval_fraction`."""
    train_ds = load_rows(cfg.train, cfg.train_split)
    if cfg.eval:
        return train_ds, load_rows(cfg.eval, cfg.eval_split), cfg.eval
    if cfg.eval_fraction > 0:
        train_ds, eval_ds = hold_out(train_ds, cfg.eval_fraction, seed, cfg.train)
        return train_ds, eval_ds, f"{cfg.train} (held-out {cfg.eval_fraction:g})"
    return train_ds, None, ""
