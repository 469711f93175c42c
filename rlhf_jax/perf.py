"""Machine ceilings measured in the running process, and the environment they were measured in.

    rate = matmul_ceiling(matmul_shapes(cfg, tokens=16))           # FLOP/s, best model shape
    bw = memory_bandwidth_bytes_per_s()                             # bytes/s, streaming read
    ceiling = decode_ceiling_tokens_per_s(cfg, 16, 48, rate, bw)    # tokens/s at that shape

A decode step of batch B at context T does B · `flops_per_token(cfg, T)` FLOPs and reads
every weight matrix once plus the keys/values of the T cached tokens
(`decode_bytes_per_step`). Neither can go faster than the machine's measured matmul rate
and read bandwidth, so B tokens take at least max(FLOPs / rate, bytes / bandwidth) seconds:
the ceiling is the smaller of the compute and the memory bound. Both rates are measured here,
with the same XLA backend as the model, rather than taken from a datasheet.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import Family, TransformerConfig, flops_per_token


# ---------------------------------------------------------------------------------------------
# Timing.


def _block(out: Any) -> Any:
    """Waits for every array in `out` (a pytree); non-JAX leaves are left as they are."""
    for leaf in jax.tree_util.tree_leaves(out):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return out


def timeit(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds per call of `fn()` (its outputs waited for), `repeats` times after `warmup` calls."""
    for _ in range(warmup):
        _block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return times


def median(times: Sequence[float]) -> float:
    return float(statistics.median(times))


def spread(times: Sequence[float]) -> float:
    """(max − min) / median: the relative range of repeated timings."""
    m = median(times)
    return float((max(times) - min(times)) / m) if m > 0 else 0.0


def summary(times: Sequence[float]) -> dict:
    """Median, min, max and relative spread of a list of timings (seconds)."""
    return {"median": median(times), "min": float(min(times)), "max": float(max(times)),
            "spread": spread(times), "n": len(times)}


# ---------------------------------------------------------------------------------------------
# Compute: matmul rate.


def matmul_flops_per_s(m: int, k: int, n: int, dtype=jnp.float32, repeats: int = 5) -> float:
    """Measured rate (FLOP/s) of a [m, k] @ [k, n] matmul: 2·m·k·n / median seconds per matmul.

    One jitted call runs a loop of matmuls at exactly this shape, one after the other (the way
    a model's layers run), so that the Python call overhead does not count for small shapes.
    The weight stays the same, so a small one stays in cache: this is the compute rate at that
    shape, not the memory bound (see `memory_bandwidth_bytes_per_s`).
    """
    flops = 2.0 * m * k * n
    inner = max(1, min(256, int(2e8 // max(flops, 1))))  # ≥ ~0.2 GFLOP per timed call
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (m, k), dtype)
    b = jax.random.normal(kb, (k, n), dtype)

    @jax.jit
    def f(a, b):
        def body(i, a):  # each matmul's input depends on the previous output: none is hoisted
            return a + 1e-30 * jnp.sum(jnp.dot(a, b))
        return jax.lax.fori_loop(0, inner, body, a)

    times = timeit(lambda: f(a, b), repeats=repeats, warmup=2)
    return inner * flops / median(times)


def mfu_ceiling_flops_per_s(repeats: int = 5) -> float:
    """The MFU ceiling of a training run: the measured rate of a 1024³ matmul in float32 on
    CPU, in bfloat16 on an accelerator (the dtypes their peak rates are quoted for)."""
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return matmul_flops_per_s(1024, 1024, 1024, dtype, repeats)


def matmul_shapes(cfg: TransformerConfig, tokens: int) -> list[tuple[int, int, int]]:
    """The (m, k, n) of every distinct matmul of a forward over `tokens` tokens (m = tokens)."""
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = [
        (tokens, d, cfg.num_heads * hd),  # q
        (tokens, d, cfg.num_kv_heads * hd),  # k, v
        (tokens, cfg.num_heads * hd, d),  # o
        (tokens, d, f),  # fc / gate / up
        (tokens, f, d),  # down
        (tokens, d, cfg.vocab_size),  # LM head
    ]
    return sorted(set(shapes))


def matmul_ceiling(shapes: Iterable[tuple[int, int, int]], dtype=jnp.float32,
                   repeats: int = 5) -> float:
    """The best measured matmul rate (FLOP/s) over `shapes`: the compute ceiling for them."""
    return max(matmul_flops_per_s(m, k, n, dtype, repeats) for m, k, n in shapes)


# ---------------------------------------------------------------------------------------------
# Memory: read bandwidth.


def memory_bandwidth_bytes_per_s(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Measured read bandwidth (bytes/s): a jitted sum over a float32 array of `nbytes`.

    Choose `nbytes` well above the last-level cache (the default 256 MiB is), so every call
    streams the array from main memory.
    """
    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    times = timeit(lambda: f(x), repeats=repeats, warmup=2)
    return x.nbytes / median(times)


# ---------------------------------------------------------------------------------------------
# The decode ceiling.


def weight_elements(cfg: TransformerConfig) -> int:
    """Elements of the weight matrices one decode step reads in full.

    Per layer: q, k, v, o and the MLP matrices; then the LM head (the tied embedding for
    GPT-2). The embedding and position lookups read only B rows, and biases and norm scales
    are O(D) per layer: both are left out (< 0.1% at any real shape).
    """
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    mlp = d * f * (2 if cfg.family == Family.GPT2 else 3)
    return cfg.num_layers * (attn + mlp) + cfg.vocab_size * d


def decode_bytes_per_step(cfg: TransformerConfig, batch: int, context_len: int,
                          dtype_bytes: int = 4) -> int:
    """Bytes one decode step must read: every weight matrix once, plus the keys and values
    of `context_len` cached tokens for each of the `batch` rows in every layer."""
    kv = 2 * cfg.num_layers * batch * cfg.num_kv_heads * context_len * cfg.head_dim
    return (weight_elements(cfg) + kv) * dtype_bytes


def decode_bounds(cfg: TransformerConfig, batch: int, context_len: int, flops_per_s: float,
                  bytes_per_s: float, dtype_bytes: int = 4) -> dict:
    """Compute and memory bounds (tokens/s) of decoding `batch` rows at `context_len`."""
    compute = flops_per_s / flops_per_token(cfg, context_len, training=False)
    memory = bytes_per_s / decode_bytes_per_step(cfg, batch, context_len, dtype_bytes) * batch
    return {"compute": compute, "memory": memory,
            "bound": "compute" if compute <= memory else "memory",
            "tokens_per_s": min(compute, memory)}


def decode_ceiling_tokens_per_s(cfg: TransformerConfig, batch: int, context_len: int,
                                flops_per_s: float, bytes_per_s: float,
                                dtype_bytes: int = 4) -> float:
    """min(FLOP/s ÷ FLOPs per token, bandwidth ÷ bytes per step × batch): the most tokens/s
    a decode step of `batch` rows at `context_len` can produce on this machine."""
    return decode_bounds(cfg, batch, context_len, flops_per_s, bytes_per_s,
                         dtype_bytes)["tokens_per_s"]


def generate_ceiling_tokens_per_s(cfg: TransformerConfig, batch: int, prompt_len: float,
                                  new_tokens: int, flops_per_s: float, bytes_per_s: float,
                                  dtype_bytes: int = 4) -> float:
    """New tokens/s of a whole generate call at the ceiling: prefill plus every decode step.

    The prefill of `batch` prompts of `prompt_len` real tokens takes at least
    max(its FLOPs / rate, weight bytes / bandwidth); decode step t (context prompt_len + t)
    at least max(B·FLOPs per token / rate, bytes per step / bandwidth). The response has
    `new_tokens` tokens: the prefill yields the first, `new_tokens - 1` decode steps the rest.
    """
    p = int(round(prompt_len))
    prefill = max(batch * p * flops_per_token(cfg, p, training=False) / flops_per_s,
                  weight_elements(cfg) * dtype_bytes / bytes_per_s)
    steps = 0.0
    for t in range(1, new_tokens):
        ctx = p + t
        steps += max(batch * flops_per_token(cfg, ctx, training=False) / flops_per_s,
                     decode_bytes_per_step(cfg, batch, ctx, dtype_bytes) / bytes_per_s)
    return batch * new_tokens / (prefill + steps)


# ---------------------------------------------------------------------------------------------
# Environment.


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or no version attribute
        return None


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def environment() -> dict:
    """Where a measurement was taken: devices, library versions, CPUs, platform."""
    devices = jax.devices()
    cpu_model = None
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_count": cpu_count(),
        "cpu_model": cpu_model or platform.processor() or None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "jax": jax.__version__,
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": load_average(),
    }


def load_average() -> Optional[list[float]]:
    """The OS's 1, 5 and 15 minute load averages (runnable processes), where it has them.

    Timings on a machine shared with other work are only comparable at similar load."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def device_label() -> str:
    """A short name for result files: 'cpu-2core', or the accelerator kind ('nvidia-h100')."""
    if jax.default_backend() == "cpu":
        return f"cpu-{cpu_count()}core"
    kind = jax.devices()[0].device_kind.lower().replace(" ", "-")
    return f"{kind}-x{jax.device_count()}"
