"""Reading and writing the safetensors format with numpy alone (bfloat16 included).

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, then the raw bytes. Reading memory-maps
the file, so a tensor is only read when it is used; nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np


class ModelFileError(ValueError):
    """A model directory or file that cannot be used; the message names it and the fix."""

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def read_header(path: str) -> tuple[dict, int]:
    """Returns (header without __metadata__, byte offset where tensor data starts)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelFileError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path) - 8:
            raise ModelFileError(f"{path} is truncated or not a safetensors file (bad header length)")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """Lazy view of one safetensors file: `names()`, `shape(name)`, `get(name)`."""

    def __init__(self, path: str):
        self.path = path
        self.header, self._start = read_header(path)
        self._mmap: Optional[np.memmap] = None

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ModelFileError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        data = self._mmap[self._start + begin : self._start + end]
        if data.size != end - begin:
            raise ModelFileError(f"{self.path} is truncated: tensor {name} is incomplete")
        return data.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def write(path: str, tensors: Mapping[str, np.ndarray], metadata: Optional[dict] = None) -> None:
    """Writes `tensors` to `path` (through a temporary file, so a crash leaves no half file)."""
    names = sorted(tensors)
    arrays = [np.ascontiguousarray(tensors[name]) for name in names]
    write_streamed(path, [(n, a.shape, a.dtype) for n, a in zip(names, arrays)], iter(arrays),
                   metadata)


def write_streamed(path: str, specs: Sequence[tuple[str, tuple, np.dtype]],
                   arrays: Iterable[np.ndarray], metadata: Optional[dict] = None) -> None:
    """Writes tensors whose names, shapes and dtypes are known up front (`specs`, in file
    order) while their data arrive one array at a time (`arrays`, in the same order), so no
    more than one tensor is in memory. Through a temporary file, like `write`."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        if dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot be written to safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": [int(d) for d in shape],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for (name, shape, dtype), arr in zip(specs, arrays):
            arr = np.ascontiguousarray(arr, dtype=dtype)
            if arr.shape != tuple(shape):
                raise ValueError(f"tensor {name}: got shape {arr.shape}, announced {shape}")
            f.write(arr.tobytes())
    os.replace(tmp, path)


class CheckpointFiles:
    """All tensors of a Hugging Face model directory (one file, or shards with an index)."""

    def __init__(self, directory: str):
        single = os.path.join(directory, "model.safetensors")
        index = os.path.join(directory, "model.safetensors.index.json")
        self._where: dict[str, SafetensorsFile] = {}
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = {}
            for name, fname in weight_map.items():
                fpath = os.path.join(directory, fname)
                if fpath not in files:
                    if not os.path.exists(fpath):
                        raise FileNotFoundError(
                            f"{index} names shard {fname}, which is missing from {directory}"
                        )
                    files[fpath] = SafetensorsFile(fpath)
                self._where[name] = files[fpath]
        elif os.path.exists(single):
            f = SafetensorsFile(single)
            self._where = {name: f for name in f.names()}
        else:
            found = sorted(os.listdir(directory))
            hint = ""
            if any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in found):
                hint = (" Pickle-based weights (.bin/.pt) are refused because loading them can run "
                        "code; re-save the model with safe_serialization=True.")
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {directory} "
                f"(found: {', '.join(found) or 'nothing'}).{hint}"
            )

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)
