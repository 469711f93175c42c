"""Device mesh, logical-axis rules, sharded initialisation and placement.

Every parameter carries logical axis names from the moment it is created (see
`models/transformer.py`); the rules below map them to the mesh axes `data`, `fsdp` and
`tensor`. Rules are data: a config may replace them.

    mesh = make_mesh((1, -1, 1))                      # all devices on fsdp
    params = init_params(model, rng, ids, mesh)       # created sharded, never whole on one device
    with use_mesh(mesh):                              # activations get their constraints too
        logits = jax.jit(model.apply)({"params": params}, ids)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis name → mesh axis (or axes, or None for replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("layers", None),
    ("norm", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces one -1 in `shape` by what fills `num_devices`; checks the product."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: use positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(
                f"mesh shape {shape}: {num_devices} devices are not divisible by {known}"
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are "
            f"available; use sizes whose product is {num_devices}, or -1 on one axis"
        )
    return shape


def check_mesh(shape: Sequence[int], key: str = "mesh") -> tuple[int, ...]:
    """`resolve_mesh_shape` for this process's devices, as a config error naming `key`."""
    from rlhf_jax.config import ConfigError

    try:
        return resolve_mesh_shape(shape, jax.device_count())
    except ValueError as e:
        raise ConfigError(key, f"config key '{key}': {e}") from None


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Optional[Sequence] = None) -> Mesh:
    """A mesh with axes (data, fsdp, tensor) over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence = DEFAULT_RULES):
    """Context in which `with_logical_constraint` on activations resolves against `mesh`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops the mesh axes of any dimension they do not divide (that dimension is replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if size and dim % size == 0 else None)
    return P(*out)


def strip_boxes(tree: Any) -> Any:
    """The values inside logical-partitioning boxes (unlike `nn.unbox`, adds no constraint)."""
    return jax.tree_util.tree_map(
        lambda x: x.value if isinstance(x, nn.Partitioned) else x,
        tree,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )


def shardings_for(abstract: Any, mesh: Mesh, rules: Sequence = DEFAULT_RULES) -> Any:
    """NamedShardings for a tree of (logically boxed) shapes, e.g. from `jax.eval_shape`.

    A dimension that its mesh axes do not divide (a vocabulary of 50257 over 8 devices)
    is replicated instead of failing.
    """
    specs = nn.get_partition_spec(abstract)
    mesh_specs = nn.logical_to_mesh(specs, tuple(rules))
    shapes = strip_boxes(abstract)
    return jax.tree_util.tree_map(
        lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
        mesh_specs,
        shapes,
        is_leaf=lambda x: isinstance(x, P),
    )


def param_shardings(model: nn.Module, mesh: Mesh, *example_inputs, rules=DEFAULT_RULES) -> Any:
    """NamedShardings of `model`'s params ({'params': ...} stripped)."""
    with nn.logical_axis_rules(()):  # shapes only: no activation constraints, whatever the context
        abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *example_inputs)["params"]
    return shardings_for(abstract, mesh, rules)


def init_params(
    model: nn.Module,
    rng: jax.Array,
    *example_inputs,
    mesh: Optional[Mesh] = None,
    rules: Sequence = DEFAULT_RULES,
) -> Any:
    """Random params of `model`, created directly in their shardings (plain arrays, unboxed)."""
    def init(rng):
        return nn.unbox(model.init(rng, *example_inputs)["params"])

    if mesh is None:
        return jax.jit(init)(rng)
    out_shardings = param_shardings(model, mesh, *example_inputs, rules=rules)
    with use_mesh(mesh, rules):
        return jax.jit(init, out_shardings=out_shardings)(rng)


def place(host_arrays: Any, shardings: Any) -> Any:
    """Host arrays → global jax Arrays in `shardings`; each device gets only its slice.

    A leaf may be anything with `shape` and numpy indexing (a memory map, a lazily read
    checkpoint param): only the slices this process's devices hold are indexed.
    """
    def one(x, sharding):
        x = x if hasattr(x, "shape") and hasattr(x, "__getitem__") else np.asarray(x)
        return jax.make_array_from_callback(tuple(x.shape), sharding,
                                            lambda idx: np.asarray(x[idx]))

    return jax.tree_util.tree_map(one, host_arrays, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis split over data × fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host batch (pytree of numpy arrays, leading axis = batch) on the mesh.

    On several hosts each passes its own rows; together they form the global batch.
    """
    def one(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, max(x.ndim, 1))
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        if jax.process_count() == 1:
            n = mesh.shape["data"] * mesh.shape["fsdp"]
            if x.shape[0] % n:
                raise ValueError(
                    f"batch of {x.shape[0]} rows cannot be split over data×fsdp = {n} devices; "
                    f"use a batch size divisible by {n}"
                )
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(one, batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
