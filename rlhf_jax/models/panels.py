"""Column panels: the decode step's weights laid out for XLA:CPU's small-batch matmuls.

A decode step multiplies B ≈ 16 rows by every kernel of the model, so it is bound by how
fast the kernels stream from memory. XLA:CPU's matmul for so few rows walks a row-major
[K, N] kernel 64 columns at a time, reading K rows N·4 bytes apart, and gets ~12 GB/s on
the 2-core machine of benchmarks/README.md (a contiguous read gets 25–30). The same kernel
cut into contiguous [K, 64] column panels, one dot per panel and the outputs concatenated,
streams at ~17 GB/s: the same numbers, a base-size decode step ~25% faster.

Cutting the panels inside the jitted program costs XLA:CPU one compiled kernel per slice
(~1 300 at base size, a fivefold compile), so they are cut here, on the host, once per set
of params: numpy copies into 64-byte-aligned buffers (which `jax.device_put` then wraps
without copying on CPU). The model reads them from the "panels" variable collection
(`transformer._matmul`); `rlhf_jax.models.sampling.make_generate_fn` passes them to its decode
loop when the params live on CPU, on one device or replicated over several (placed like the
params). Prefill and training keep the plain kernels.

Each panel is one more dot for XLA to compile, so they pay only for models with few of them:
`panels_pay` is the rule `make_generate_fn` follows by default (at most MAX_PANELS panels,
which keeps them for the base benchmark model and leaves a 0.5B model with a 152k vocabulary
without them). Here: the cut (`column_panels`, `decode_panels`), the rule (`panel_count`,
`panels_pay`), and the placement and per-params cache (`cpu_decode_panels`, `PanelCache`).
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.models.config import Family, TransformerConfig

PANEL_WIDTH = 64  # columns per panel: 32 and 128 measured slower on CPU
MAX_PANELS = 2048  # `panels_pay`: above this many, the compile time is not paid back
MIN_CALLS = 12  # `panels_pay`: fewer calls of one program do not pay back its longer compile
_ALIGN = 64  # bytes; a less aligned host buffer is copied by `jax.device_put`
_PANELS_PER_TASK = 16


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    size = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(size + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + size].view(dtype).reshape(shape)


def column_panels(kernels: Sequence[np.ndarray], dtype, width: int = PANEL_WIDTH,
                  pool: ThreadPoolExecutor | None = None) -> list[list[np.ndarray]]:
    """Each [K, N] kernel (one per layer) as its contiguous [K, width] column panels in
    `dtype`, the last one narrower when `width` does not divide N.

    Concatenating `x @ panel` over a kernel's panels gives `x @ kernel`. The copies run on
    `pool`'s threads.
    """
    n_layers = len(kernels)
    k, n = kernels[0].shape
    j = n // width
    main = _aligned_empty((n_layers, j, k, width), dtype)
    rest = _aligned_empty((n_layers, k, n - j * width), dtype) if n % width else None

    def copy(layer: int, start: int):
        stop = min(start + _PANELS_PER_TASK, j)
        src = kernels[layer][:, start * width:stop * width].reshape(k, stop - start, width)
        np.copyto(main[layer, start:stop].transpose(1, 0, 2), src, casting="same_kind")

    tasks = [(layer, start) for layer in range(n_layers) for start in range(0, j, _PANELS_PER_TASK)]
    list((pool.map if pool else map)(lambda t: copy(*t), tasks))
    if rest is not None:
        for layer in range(n_layers):
            np.copyto(rest[layer], kernels[layer][:, j * width:], casting="same_kind")
    return [list(main[layer]) + ([rest[layer]] if rest is not None else [])
            for layer in range(n_layers)]


def _layer_matmuls(cfg: TransformerConfig) -> list[tuple[tuple[str, ...], list[str]]]:
    """(where in a layer the panels go, the kernels whose stacked columns it multiplies by),
    as `transformer._fused_dense` stacks them: fused q/k/v (or q and k/v), o, the MLP."""
    if cfg.num_kv_heads == cfg.num_heads:
        spec = [(("attn", "qkv"), ["q", "k", "v"])]
    else:
        spec = [(("attn", "q"), ["q"]), (("attn", "kv"), ["k", "v"])]
    spec.append((("attn", "o", "kernel"), ["o"]))
    if cfg.family == Family.GPT2:
        spec.append((("mlp", "fc", "kernel"), ["fc"]))
    else:
        spec.append((("mlp", "gate_up"), ["gate", "up"]))
    spec.append((("mlp", "down", "kernel"), ["down"]))
    return spec


def _kernel_width(cfg: TransformerConfig, name: str) -> int:
    """N of a layer's [K, N] kernel `name`."""
    return {"q": cfg.num_heads * cfg.head_dim, "k": cfg.num_kv_heads * cfg.head_dim,
            "v": cfg.num_kv_heads * cfg.head_dim, "o": cfg.hidden_size,
            "fc": cfg.intermediate_size, "gate": cfg.intermediate_size,
            "up": cfg.intermediate_size, "down": cfg.hidden_size}[name]


def panel_count(cfg: TransformerConfig, width: int = PANEL_WIDTH) -> int:
    """How many column panels `decode_panels` cuts for `cfg`: every one is a dot of its own
    in the compiled decode step."""
    per_layer = sum(-(-_kernel_width(cfg, name) // width)
                    for _, names in _layer_matmuls(cfg) for name in names)
    return cfg.num_layers * per_layer + -(-cfg.vocab_size // width)


def panels_pay(cfg: TransformerConfig, calls: Optional[int] = None) -> bool:
    """Whether decoding `cfg` from column panels pays for its longer compile: when the model
    has at most MAX_PANELS panels (`panel_count`) and, where the caller knows how many calls
    the compiled program will serve (`rlhf-jax generate`: its batches), at least MIN_CALLS.
    `make_generate_fn` asks it by default, without `calls` (a training loop calls it once per
    iteration, hundreds of times).

    Every panel is a dot of its own in the compiled decode step, and XLA:CPU's compile time
    grows faster than their number (a matrix cut into thousands of panels, as a large
    vocabulary's LM head is, costs most), while the gain is a share of every decode step.
    Measured on the 2-core CPU of benchmarks/README.md (compile in CPU seconds, for scanned /
    unrolled layers): the base benchmark model (12 layers, width 768, vocabulary 8 192:
    1 424 panels) compiles 2.9 / 5.8 s longer and runs a call of 16 rows × 64 tokens
    0.3–0.5 s faster, paid back after 6–12 calls; a Qwen2-0.5B-shaped model (24
    layers, width 896, vocabulary 151 936: 7 126 panels, 2 374 of them the LM head's)
    compiles 67 / 116 s longer for 0.3–1.3 s a call of 8 rows × 32 tokens, 64–280 calls.
    So: panels for models of the base model's size and vocabulary that decode many
    batches, not beyond.
    """
    return panel_count(cfg) <= MAX_PANELS and (calls is None or calls >= MIN_CALLS)


def decode_panels(cfg: TransformerConfig, params: Any, width: int = PANEL_WIDTH) -> dict:
    """The "panels" collection of a decode step: every matmul kernel as `column_panels`.

    Args:
      cfg: the model's config.
      params: a `CausalLM`'s (or `CausalLMWithValueHead`'s) params, scanned or not, on CPU.

    Returns:
      Host arrays in the compute dtype, laid out for the model with unrolled layers
      (`scan_layers=False`): {"model": {"layers_0": …, …}} with one list of panels per
      matmul (fused q/k/v and gate/up as `transformer._fused_dense` stacks them), plus
      "lm_head": {"kernel": panels of the [D, V] head} (the tied embedding transposed).
    """
    params = nn.meta.unbox(params)
    trunk = params["model"]

    def kernels(*path) -> list[np.ndarray]:  # one [K, N] per layer
        def get(tree):
            for key in (*path, "kernel"):
                tree = tree[key]
            return np.asarray(tree)
        if cfg.scan_layers:
            return list(get(trunk["layers"]))
        return [get(trunk[f"layers_{i}"]) for i in range(cfg.num_layers)]

    dtype = jnp.dtype(cfg.dtype)
    layers = [{} for _ in range(cfg.num_layers)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for path, names in _layer_matmuls(cfg):
            per_name = [column_panels(kernels(path[0], name), dtype, width, pool)
                        for name in names]
            for layer, panels in zip(layers, zip(*per_name)):
                node = layer
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = [p for kernel_panels in panels for p in kernel_panels]
        head = (np.asarray(trunk["embed"]["embedding"]).T if cfg.tie_word_embeddings
                else np.asarray(params["lm_head"]["kernel"]))
        (head_panels,) = column_panels([head], dtype, width, pool)
    return {"model": {f"layers_{i}": layer for i, layer in enumerate(layers)},
            "lm_head": {"kernel": head_panels}}


def cpu_decode_panels(cfg, params) -> Optional[dict]:
    """`decode_panels(cfg, params)` placed like params, for `generate`'s `panels`; None
    where panels do not apply: params traced, or not on CPU, or split over devices
    (tensor-parallel)."""
    leaves = jax.tree.leaves(params)
    if not all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)
               and x.sharding.is_fully_replicated
               and all(d.platform == "cpu" for d in x.sharding.device_set) for x in leaves):
        return None
    flat, tree = jax.tree.flatten(decode_panels(cfg, params))
    # Committed like the params: a committed input would commit the rollout, and every jitted
    # step it feeds would compile again for the new placement.
    committed = any(x.committed for x in leaves)
    flat = jax.device_put(flat, leaves[0].sharding) if committed else jax.device_put(flat)
    return jax.tree.unflatten(tree, flat)


class PanelCache:
    """`cpu_decode_panels` of the last params seen (weak references: the panels go with the
    params)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.refs = []  # weak references to the params leaves the panels were cut from
        self.panels = None

    def __call__(self, params):
        leaves = jax.tree.leaves(params)
        if len(self.refs) != len(leaves) or any(r() is not x for r, x in zip(self.refs, leaves)):
            self.refs, self.panels = [], None  # the old panels go before the new are cut
            self.panels = cpu_decode_panels(self.cfg, params)
            if self.panels is not None:
                self.refs = [weakref.ref(x) for x in leaves]
        return self.panels
