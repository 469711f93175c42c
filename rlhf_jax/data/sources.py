"""Rows from wherever they are, through `datasets`: local files, `save_to_disk` directories,
or the Hugging Face Hub (tried only when no local path of that name exists).

Every loaded dataset gets a `ROW` column with each row's index in its source, so that a
message about a bad row names the row the user can find, after any split or host slice.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Optional

import numpy as np

from rlhf_jax.data.formats import DataError

ROW = "_row"
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                 ".arrow": "arrow"}


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


def _first_bad_json_line(path: str) -> Optional[str]:
    """'line N: why' for the first line of a .jsonl file that is not a JSON object."""
    import json

    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {n} is not valid JSON ({e.msg}, column {e.colno})"
            if not isinstance(row, dict):
                return f"line {n} is a {type(row).__name__}, not a JSON object of columns"
    return None


def _builder(source: str, files: list[str]) -> str:
    exts = {os.path.splitext(f)[1].lower() for f in files}
    if len(exts) != 1 or next(iter(exts)) not in FILE_BUILDERS:
        raise DataError(
            f"{source}: cannot tell how to read files with extensions {sorted(exts)}; use "
            f"{', '.join(FILE_BUILDERS)} files, a save_to_disk directory, or a hub name"
        )
    return FILE_BUILDERS[exts.pop()]


def _from_dir(path: str, split: str):
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
            f"Hub failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Offline? Give a "
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
    """
    import datasets

    path = os.path.expanduser(source)
    files = sorted(glob.glob(path)) if glob.has_magic(path) else []
    with _quiet():
        if os.path.isdir(path):
            ds = _from_dir(path, split)
        elif os.path.isfile(path) or files:
            files = files or [path]
            builder = _builder(source, files)
            try:
                ds = datasets.load_dataset(builder, data_files=files, split="train")
            except Exception as e:  # noqa: BLE001 - a malformed file
                bad = [(f, _first_bad_json_line(f)) for f in files if f.endswith(".jsonl")]
                bad = [(f, why) for f, why in bad if why]
                if bad:
                    raise DataError(f"{bad[0][0]}: {bad[0][1]}; write one JSON object per "
                                    "line") from None
                raise DataError(f"{source}: could not be read as {builder} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        elif _looks_local(source):
            raise DataError(f"{source}: no such file or directory")
        else:
            ds = _from_hub(source, split)
    if ROW in ds.column_names:
        ds = ds.remove_columns(ROW)
    return ds.add_column(ROW, np.arange(len(ds), dtype=np.int64))


def hold_out(ds, fraction: float, seed: int):
    """(train, held-out) split of `ds`, the same on every host for a seed."""
    if not 0 < fraction < 1 or len(ds) < 2:
        raise DataError(f"cannot hold out {fraction} of {len(ds)} rows")
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
        train_ds, eval_ds = hold_out(train_ds, cfg.eval_fraction, seed)
        return train_ds, eval_ds, f"{cfg.train} (held-out {cfg.eval_fraction:g})"
    return train_ds, None, ""
