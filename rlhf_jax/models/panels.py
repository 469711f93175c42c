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

    # (where in a layer, the kernels whose stacked columns it multiplies by)
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

    dtype = jnp.dtype(cfg.dtype)
    layers = [{} for _ in range(cfg.num_layers)]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        for path, names in spec:
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
    """`cpu_decode_panels` of the last params seen (weak references: the panels go with the params)."""

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
