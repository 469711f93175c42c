"""Pure loss functions of RLHF. Each returns sums over real tokens (or pairs) and their count,
so that averaging happens once, after gradient accumulation, and padding never skews a mean.

Shapes: B rows, R response tokens; `mask` [B, R] is 1 at real tokens.
"""

from __future__ import annotations

import enum
from typing import Optional

import jax
import jax.numpy as jnp


def bradley_terry_loss(
    chosen_scores: jax.Array, rejected_scores: jax.Array, margin: Optional[jax.Array] = None
) -> jax.Array:
    """Per-pair Bradley-Terry loss [B]: −log σ(r_chosen − r_rejected − margin).

    The preference model P(chosen ≻ rejected) = σ(r_c − r_r); an optional per-pair margin
    asks for a larger gap where labellers were more certain (Llama 2).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -jax.nn.log_sigmoid(diff)


class KLEstimator(str, enum.Enum):
    K1 = "k1"
    K2 = "k2"
    K3 = "k3"


def kl_penalty(logprobs: jax.Array, ref_logprobs: jax.Array, estimator: KLEstimator) -> jax.Array:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π (Schulman, "Approximating KL").

    With log r = log π_ref(y) − log π(y):
      k1 = −log r                 unbiased, can be negative
      k2 = ½ (log r)²             biased, low variance, ≥ 0
      k3 = (r − 1) − log r        unbiased, low variance, ≥ 0
    """
    log_ratio = ref_logprobs - logprobs
    estimator = KLEstimator(estimator)
    if estimator == KLEstimator.K1:
        return -log_ratio
    if estimator == KLEstimator.K2:
        return 0.5 * log_ratio**2
    return jnp.expm1(log_ratio) - log_ratio


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    clip_eps: float,
    dual_clip: Optional[float] = None,
) -> tuple[jax.Array, jax.Array, dict]:
    """Clipped surrogate of PPO (Schulman et al. 2017), summed over real tokens.

        ρ = exp(log π − log π_old)
        L = max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε))
        dual clip (Ye et al. 2020), for A < 0 only:  L = min(L, −c·A)

    Returns:
      (loss_sum, token_count, metric sums: clipfrac, approx_kl (½(log ρ)²), ratio).
    """
    mask = mask.astype(jnp.float32)
    log_ratio = logprobs - old_logprobs
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = jnp.where(advantages < 0, jnp.minimum(loss, -dual_clip * advantages), loss)
    metrics = {
        "clipfrac": jnp.sum((clipped > unclipped) * mask),
        "approx_kl": jnp.sum(0.5 * log_ratio**2 * mask),
        "ratio": jnp.sum(ratio * mask),
    }
    return jnp.sum(loss * mask), jnp.sum(mask), metrics


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    clip_eps: Optional[float],
) -> tuple[jax.Array, jax.Array, dict]:
    """Clipped value loss, summed over real tokens.

        L_V = ½ max((V − R)², (clip(V, V_old − ε, V_old + ε) − R)²)     (ε = None: ½ (V − R)²)

    Returns:
      (loss_sum, token_count, metric sums: vf_clipfrac).
    """
    mask = mask.astype(jnp.float32)
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        loss, clipfrac = unclipped, jnp.zeros_like(unclipped)
    else:
        clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        clipped = (clipped_values - returns) ** 2
        loss = jnp.maximum(unclipped, clipped)
        clipfrac = (clipped > unclipped).astype(jnp.float32)
    return 0.5 * jnp.sum(loss * mask), jnp.sum(mask), {"vf_clipfrac": jnp.sum(clipfrac * mask)}


def entropy_sum(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Σ over real tokens of H(softmax(logits)) = −Σ_v p_v log p_v; logits [B, R, V]."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(-jnp.sum(jnp.exp(logp) * logp, axis=-1) * mask)
