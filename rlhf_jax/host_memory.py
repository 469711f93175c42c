"""Keep freed host memory in the process, so XLA:CPU's per-step buffers stop page-faulting.

XLA on CPU allocates each step's temporary buffers (activations, gradients: hundreds of MB
per training step) with `malloc` and frees them at the end of the step. glibc serves blocks
above its mmap threshold with fresh `mmap`s and unmaps them on `free`, so every step touches
new pages: the kernel faults in and zeroes each 4 KiB page again. On the small benchmark
model (4 layers, width 256, 32 × 64 tokens) that is ~86 000 page faults and ~160 ms of
kernel time per forward + backward step of ~440 ms on 2 cores.

`retain_freed_memory()` tells glibc to serve every block from its heap (no mmap), to keep
one arena, and never to trim the heap: after the first step the same pages are reused and
the faults fall to a few hundred per step (the step to ~375 ms). The trim threshold is set to
-1, which glibc reads as SIZE_MAX: the largest positive int (2 GiB) is not enough, since a
base-sized PPO update (2 × 91 M params) frees more than 2 GiB at once and glibc then gave the
top back (~500 000 faults, ~1 s of a 6.3 s step). Memory the process has used stays
reserved for it until it exits, as with the caching allocators of GPU runtimes.

The CLI and the benchmark scripts call it at start-up; a program that imports the training
steps may call it itself. It does nothing (returns False) where libc is not glibc, and where
JAX will run on a GPU or TPU (`jax_backend`): there the step's buffers live in the
accelerator runtime's own memory pool, which already reuses them, and the host's memory
(input pipelines, checkpoint and export I/O) keeps glibc's defaults, which hand large freed
blocks back to the system.

`freeze_live_objects()` is the same idea for Python's cyclic garbage collector: the objects
alive after start-up (imported modules, loaded configs and models) are never garbage, yet
every full collection scanned them again. In the base PPO benchmark a full collection took
0.27–0.37 s, about once an iteration, in whichever phase was allocating at the time (often
generation, which allocates ~1 400 arrays of decode panels); with the imports frozen, 0.07–0.2 s.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import glob
import importlib.util
import os
import pathlib
import pkgutil
import sys
from typing import Mapping

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


# What JAX's own start-up checks before it tries a platform (jax/_src/hardware_utils.py).
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")
_TPU_PCI_VENDOR = "0x1ae0"  # Google


def jax_backend(environ: Mapping[str, str] = os.environ) -> str:
    """The platform JAX's default backend will be: "cpu", "gpu", "tpu", or the first name in
    JAX_PLATFORMS; decided without starting a backend, or importing jax.

    JAX_PLATFORMS (or the older JAX_PLATFORM_NAME), when set, decides: its first entry is
    tried first. Otherwise JAX prefers a TPU, then a GPU, over the CPU, and uses one only
    where both its plugin is installed (libtpu; a `jax_plugins` CUDA or ROCm plugin) and the
    device is there; so does this.
    """
    requested = environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or ""
    first = requested.split(",")[0].strip().lower()
    if first:
        return "gpu" if first in ("cuda", "rocm") else first
    if _tpu_plugin(environ) and _tpu_chip():
        return "tpu"
    if _gpu_plugin() and any(os.path.exists(path) for path in _GPU_DEVICE_FILES):
        return "gpu"
    return "cpu"


def _tpu_plugin(environ: Mapping[str, str]) -> bool:
    return (os.path.isfile(environ.get("TPU_LIBRARY_PATH", ""))
            or importlib.util.find_spec("libtpu") is not None)


def _tpu_chip() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if pathlib.Path(vendor).read_text().strip() == _TPU_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def _gpu_plugin() -> bool:
    """A CUDA or ROCm plugin in the `jax_plugins` namespace or entry points (how JAX finds
    them: jax/_src/xla_bridge.py, `discover_pjrt_plugins`)."""
    names = []
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names += [m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)]
    from importlib.metadata import entry_points

    names += [e.name + " " + e.value for e in entry_points(group="jax_plugins")]
    return any("cuda" in n.lower() or "rocm" in n.lower() for n in names)


def retain_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Configure glibc malloc as described above where JAX will run on the CPU; True when it
    was (or already is) applied, False on a GPU or TPU host and where libc is not glibc."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or jax_backend(environ) != "cpu":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((_M_MMAP_MAX, 0),  # every block from the heap, none from a fresh mmap
                (_M_TRIM_THRESHOLD, -1),  # never give the heap's top back (-1: SIZE_MAX)
                (_M_TOP_PAD, 0),
                (_M_ARENA_MAX, 1))  # one heap for every thread, so freed blocks are reused
    _applied = all(mallopt(param, value) == 1 for param, value in settings)
    return _applied


def freeze_live_objects() -> int:
    """`gc.freeze()`: every object alive now moves to the collector's permanent generation,
    which its collections no longer scan. Call it after start-up (imports, model loading).
    Returns how many objects are frozen."""
    gc.collect()  # what is garbage already goes first, not into the permanent generation
    gc.freeze()
    return gc.get_freeze_count()
