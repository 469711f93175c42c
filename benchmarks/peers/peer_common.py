"""What the TRL peer scripts share: offline environment, logging, the host allocator and GC.

They run in their own venv (benchmarks/peers/.venv-trl), which has no rlhf_jax installed;
`retain_freed_memory` loads rlhf_jax/host_memory.py by path (it needs only the standard
library) so that the peer's process gets the same glibc malloc settings as rlhf_jax's side.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def logger(name: str):
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {msg}", file=sys.stderr, flush=True)
    return log


def _host_memory():
    spec = importlib.util.spec_from_file_location(
        "rlhf_jax_host_memory", os.path.join(ROOT, "rlhf_jax", "host_memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def retain_freed_memory() -> bool:
    """rlhf_jax.host_memory.retain_freed_memory, applied in this process."""
    return _host_memory().retain_freed_memory()


def freeze_live_objects() -> int:
    """rlhf_jax.host_memory.freeze_live_objects, applied in this process (after set-up, as
    rlhf_jax's side does before its timed runs)."""
    return _host_memory().freeze_live_objects()
