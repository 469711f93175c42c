"""Supervised fine-tuning (and plain language-model pretraining): the pure step.

The loss is the mean negative log-likelihood of the tokens where `loss_mask` is 1 (the
completion; every token for pretraining), predicted from the tokens before them:

    L = − Σ_{b,t} m[b,t+1] · log p(x[b,t+1] | x[b,≤t]) / Σ m[b,t+1]
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from rlhf_jax import optim


def token_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array):
    """Sum and count of next-token NLL over masked targets.

    Args:
      logits: [B, T, V] float32.
      input_ids: [B, T].
      loss_mask: [B, T], 1 where the token is a target (its prediction comes from t − 1).

    Returns:
      (nll_sum, token_count, correct_sum) scalars.
    """
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, T-1, V]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    correct = (jnp.argmax(logp, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(correct * mask)


def loss_fn(params: Any, batch: dict, model) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """(nll_sum, (count, metric sums)) for `optim.accumulate_gradients`."""
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    nll, count, correct = token_nll(logits, batch["input_ids"], batch["loss_mask"])
    return nll, (count, {"loss": nll, "accuracy": correct})


def train_step(
    state: optim.TrainState,
    batch: dict,
    *,
    model,
    tx: optax.GradientTransformation,
    grad_accum: int = 1,
) -> tuple[optim.TrainState, dict]:
    """One SFT update on `batch` = {input_ids, attention_mask, loss_mask}, each [B, T].

    Close over `model`, `tx` and `grad_accum` with `functools.partial`, then jit with
    `donate_argnums=0`.
    """
    grads, count, sums = optim.accumulate_gradients(
        functools.partial(loss_fn, model=model), state.params, batch, grad_accum
    )
    new_state, norms = optim.apply_gradients(state, grads, tx)
    finite = optim.all_finite(sums["loss"], norms["grad_norm"], norms["update_norm"])
    return new_state, {**sums, **norms, "tokens": count, "finite": finite}
