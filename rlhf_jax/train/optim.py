"""Optimizer from config, the (sharded) train state, and gradient accumulation shared by every
stage."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax import sharding as shd
from rlhf_jax.config import check


class Schedule(str, enum.Enum):
    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with warmup and decay, global-norm clipping.

    Attributes:
      learning_rate: peak learning rate.
      schedule: decay after warmup: constant, linear (to 0) or cosine (to 0).
      warmup_steps: linear warmup from 0 over this many optimizer steps.
      weight_decay: decoupled weight decay (not applied to biases, norms or embeddings).
      b1: Adam first-moment decay.
      b2: Adam second-moment decay.
      eps: Adam epsilon.
      max_grad_norm: clip the global gradient norm to this (0 = no clipping).
    """

    learning_rate: float = 1e-5
    schedule: Schedule = Schedule.CONSTANT
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def __post_init__(self):
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "a positive number")
        check(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "0 or more")
        check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "0 or more")
        check(0 <= self.b1 < 1, "b1", self.b1, "a number in [0, 1)")
        check(0 <= self.b2 < 1, "b2", self.b2, "a number in [0, 1)")
        check(self.max_grad_norm >= 0, "max_grad_norm", self.max_grad_norm, "0 (off) or more")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if cfg.schedule == Schedule.CONSTANT:
        after = optax.constant_schedule(cfg.learning_rate)
    elif cfg.schedule == Schedule.LINEAR:
        after = optax.linear_schedule(cfg.learning_rate, 0.0, decay_steps)
    else:
        after = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), after],
                                [warmup])


def _decay_mask(params: Any) -> Any:
    """True for matrices (kernels), False for biases, norm scales and embeddings."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: "kernel" in jax.tree_util.keystr(path), params
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW on the schedule."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps),
        b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=_decay_mask,
    )
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
    return adamw


@flax.struct.dataclass
class TrainState:
    """Everything one model's optimisation needs, as a pytree (checkpointed whole)."""

    step: jax.Array
    params: Any
    opt_state: Any


def create_state(params: Any, tx: optax.GradientTransformation) -> TrainState:
    """Step 0, `params`, and the optimizer's fresh state (unsharded; see `sharded_state`)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(abstract_params: Any, tx: optax.GradientTransformation, mesh,
                    rules=shd.DEFAULT_RULES) -> TrainState:
    """The NamedShardings of a train state over `abstract_params` (logically boxed shapes,
    e.g. `models.abstract_params(model)`, or a dict of them for several models): every
    optimizer moment sharded like the param it follows, the step replicated."""
    abstract = jax.eval_shape(lambda p: create_state(p, tx), abstract_params)
    return shd.shardings_for(abstract, mesh, rules)


def sharded_state(abstract_params: Any, params: Any, tx: optax.GradientTransformation, mesh,
                  rules=shd.DEFAULT_RULES) -> tuple[TrainState, TrainState]:
    """(train state, its shardings) created in place on `mesh`, never whole on one device.

    Jitting `create_state` without output shardings would leave XLA free to replicate the
    Adam moments: compiled for 16 TPU v5p chips, an 8B policy and critic then need 123 GB per
    chip instead of 10.9 GB.
    """
    shardings = state_shardings(abstract_params, tx, mesh, rules)
    with shd.use_mesh(mesh, rules):
        state = jax.jit(lambda p: create_state(p, tx), out_shardings=shardings)(params)
    return state, shardings


def _update(state: TrainState, grads: Any, tx: optax.GradientTransformation):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, optax.global_norm(updates)


def apply_gradients_if_finite(
    state: TrainState, grads: Any, tx: optax.GradientTransformation, loss: jax.Array
) -> tuple[TrainState, dict]:
    """`apply_gradients` when the loss and every gradient are finite; otherwise the params and
    optimizer state stay as they were (the step is still counted) and update_norm is NaN.

    Metrics: grad_norm, update_norm and finite (a bool). One `lax.cond` decides before the
    optimizer runs, so a good step costs nothing extra. (Choosing between the updated and
    the old state after the update instead re-reads and rewrites the params and both Adam
    moments: measured ~0.9 s per step for 2 × 91 M params on 2 CPU cores, against ~0.55 s
    for the update itself.)
    """
    grad_norm = optax.global_norm(grads)
    finite = all_finite(loss, grad_norm)

    def keep(state):
        return state.replace(step=state.step + 1), jnp.full((), jnp.nan, jnp.float32)

    new_state, update_norm = jax.lax.cond(finite, lambda s: _update(s, grads, tx), keep, state)
    return new_state, {"grad_norm": grad_norm, "update_norm": update_norm, "finite": finite}


def gradient_step(
    state: TrainState, loss_fn: Callable, batch: Any, tx: optax.GradientTransformation,
    num_microbatches: int = 1,
) -> tuple[TrainState, dict, jax.Array]:
    """One optimizer update from the mean of `loss_fn` over `batch` (`accumulate_gradients`),
    skipped when not finite (`apply_gradients_if_finite`): the body of every stage's step.

    Returns:
      (new state, metrics: the metric means of `loss_fn`, grad_norm, update_norm and finite,
      the count they are means over).
    """
    grads, count, means = accumulate_gradients(loss_fn, state.params, batch, num_microbatches)
    new_state, norms = apply_gradients_if_finite(state, grads, tx, means["loss"])
    return new_state, {**means, **norms}, count


def split_microbatches(batch: Any, num: int) -> Any:
    """[B, ...] → [num, B/num, ...] for every leaf."""
    def one(x):
        if x.shape[0] % num:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {num} microbatches")
        return x.reshape(num, x.shape[0] // num, *x.shape[1:])

    return jax.tree_util.tree_map(one, batch)


def accumulate_gradients(
    loss_fn: Callable[[Any, Any], tuple[jax.Array, tuple[jax.Array, dict]]],
    params: Any,
    batch: Any,
    num_microbatches: int,
) -> tuple[Any, jax.Array, dict]:
    """Sums gradients over microbatches with `lax.scan`, then divides by the total count.

    `loss_fn(params, microbatch) -> (loss_sum, (count, metric_sums))` returns a SUM over its
    tokens/pairs and their count, so the accumulated mean is exact whatever the padding:
    mean = Σ loss_sum / Σ count, and likewise its gradient.

    Returns (grads of the mean, total count, metric sums divided by the total count).
    """
    grad_fn = jax.grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        grads, (count, sums) = grad_fn(params, batch)
    else:
        micro = split_microbatches(batch, num_microbatches)

        def body(carry, mb):
            return jax.tree_util.tree_map(jnp.add, carry, grad_fn(params, mb)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        zeros = jax.tree_util.tree_map(
            lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, params, first)
        )
        (grads, (count, sums)), _ = jax.lax.scan(body, zeros, micro)
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
    return grads, count, jax.tree_util.tree_map(lambda s: s / denom, sums)


def all_finite(*trees) -> jax.Array:
    """True when every leaf of every tree is finite (a scalar bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for t in trees for x in jax.tree_util.tree_leaves(t)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
