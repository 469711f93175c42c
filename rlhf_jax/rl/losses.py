"""Pure loss functions of RLHF: the Bradley-Terry loss of reward modelling and the losses of
the PPO update (Schulman et al. 2017), per token over the response.

Each PPO loss returns (sum, count, metric sums) over the real tokens of its batch: the caller
adds them up over microbatches and divides once, so padding and gradient accumulation never
skew a mean. Metrics are sums too (divide by the same count); they carry no gradient.

Shapes: B responses, T response tokens, V vocabulary. `mask` [B, T] is 1 at real response
tokens; values at masked positions (garbage, NaN) never reach a result or a gradient.
Per-token KL estimators live in `rlhf_jax.rl.advantages` (they shape the reward).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def bradley_terry_loss(
    chosen_scores: Array, rejected_scores: Array, margin: Optional[Array] = None
) -> Array:
    """Per-pair Bradley-Terry loss [B]: −log σ(r_chosen − r_rejected − margin).

    The preference model P(chosen ≻ rejected) = σ(r_c − r_r); an optional per-pair margin
    asks for a larger gap where labellers were more certain (Llama 2).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -jax.nn.log_sigmoid(diff)



def _f32(x) -> Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _sum(x: Array, real: Array) -> Array:
    return jnp.sum(jnp.where(real, x, 0.0))


def policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    clip_eps: float,
    dual_clip: Optional[float] = None,
) -> tuple[Array, Array, dict]:
    """Clipped surrogate objective of PPO, as a loss to minimise.

        ρ_t = exp(log π(y_t) − log π_old(y_t))
        L_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε))
        dual clip (Ye et al. 2020), only where A_t < 0:   L_t ← min(L_t, −c·A_t)

    The dual clip bounds the loss of a token whose ratio has run far above 1 + ε with a
    negative advantage, where the plain clip leaves −A·ρ unbounded. Where a bound is chosen,
    the gradient with respect to log π is 0.

    Args:
      logprobs: [B, T] log π under the current parameters (differentiated).
      old_logprobs: [B, T] log π_old of the policy that sampled.
      advantages: [B, T] A_t (whitened or not, by the caller).
      mask: [B, T].
      clip_eps: ε.
      dual_clip: c > 1, or None for none.
    Returns:
      (Σ_t L_t, token count, metric sums over real tokens:
       clipfrac: tokens where the clipped term is the larger one,
       dual_clipfrac: tokens where the dual-clip bound was taken,
       approx_kl: ½ (log ρ)²,  approx_kl_k3: (ρ − 1) − log ρ   (estimates of KL(π_old ‖ π)),
       ratio: ρ).
    """
    real = mask > 0
    # Zeroed at padding before exp: a NaN there would otherwise reach the gradient.
    log_ratio = jnp.where(real, _f32(logprobs) - _f32(old_logprobs), 0.0)  # [B, T]
    advantages = _f32(advantages)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = jnp.maximum(unclipped, clipped)
    dual_clipped = jnp.zeros_like(real)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual_clipped = (advantages < 0) & (bound < loss)
        loss = jnp.where(dual_clipped, bound, loss)
    log_ratio = jax.lax.stop_gradient(log_ratio)
    ratio = jax.lax.stop_gradient(ratio)
    metrics = {
        "clipfrac": _sum(clipped > unclipped, real),
        "dual_clipfrac": _sum(dual_clipped, real),
        "approx_kl": _sum(0.5 * log_ratio**2, real),
        "approx_kl_k3": _sum(jnp.expm1(log_ratio) - log_ratio, real),
        "ratio": _sum(ratio, real),
    }
    return _sum(loss, real), jnp.sum(real).astype(jnp.float32), metrics


def value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    clip_eps: Optional[float],
) -> tuple[Array, Array, dict]:
    """Value loss, clipped around the values of the rollout as in the reference PPO code.

        clip_eps = ε:     L_t = ½·max((V_t − R_t)², (clip(V_t, V_old − ε, V_old + ε) − R_t)²)
        clip_eps = None:  L_t = ½·(V_t − R_t)²

    Args:
      values: [B, T] V under the current parameters (differentiated).
      old_values: [B, T] V_old, the critic's values when the rollout was scored.
      returns: [B, T] R_t, the GAE value targets.
      mask: [B, T].
      clip_eps: ε, or None for the unclipped loss.
    Returns:
      (Σ_t L_t, token count, {"vf_clipfrac": tokens where the clipped error is the larger}).
    """
    real = mask > 0
    values = jnp.where(real, _f32(values), 0.0)  # keeps padding out of the gradient
    returns, old_values = _f32(returns), _f32(old_values)
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        loss, clipped_chosen = unclipped, jnp.zeros_like(real)
    else:
        clipped = (jnp.clip(values, old_values - clip_eps, old_values + clip_eps) - returns) ** 2
        loss = jnp.maximum(unclipped, clipped)
        clipped_chosen = clipped > unclipped
    count = jnp.sum(real).astype(jnp.float32)
    return 0.5 * _sum(loss, real), count, {"vf_clipfrac": _sum(clipped_chosen, real)}


def entropy_sum(logits: Array, mask: Array, temperature: float = 1.0) -> Array:
    """Entropy of the policy at each real token, summed: Σ_t H_t.

        log p = log_softmax(z / τ),   H_t = −Σ_v p_v·log p_v

    In float32 from the log-softmax, so large logits do not overflow; vocabulary entries with
    logit −inf (p = 0) add 0, not NaN, to the value and to the gradient.

    Args:
      logits: [B, T, V] the logits that predict the response tokens.
      mask: [B, T].
      temperature: τ, the sampling temperature (1 = the raw logits).
    """
    real = mask > 0
    logits = jnp.where(real[..., None], _f32(logits) / temperature, 0.0)  # padding: no NaN grads
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
    p = jnp.exp(logp)
    entropy = -jnp.sum(p * jnp.where(p > 0, logp, 0.0), axis=-1)  # [B, T]
    return _sum(entropy, real)


def logprobs_from_logits(logits: Array, tokens: Array, temperature: float = 1.0) -> Array:
    """log π(y_t) = log_softmax(z_t / τ)[y_t]: [B, T] float32.

    The temperature divides the logits exactly as in the rollout (generate.py), so that at
    the first PPO epoch log π equals the sampling policy's log π_old and ρ = 1.

    Args:
      logits: [B, T, V] the logits that predict each token (position t − 1 of the sequence).
      tokens: [B, T] int the tokens taken.
      temperature: τ.
    """
    return _token_logprobs(_f32(logits) / temperature, tokens.astype(jnp.int32))


@jax.custom_vjp
def _token_logprobs(z: Array, tokens: Array) -> Array:
    """z[y] − logsumexp(z) over the last axis: [B, T] from z [B, T, V], y [B, T]."""
    return _token_logprobs_fwd(z, tokens)[0]


def _token_logprobs_fwd(z, tokens):
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, tokens[..., None], axis=-1)[..., 0]
    return picked - lse, (z, lse, tokens)


def _token_logprobs_bwd(res, g):
    # d/dz (z_y − lse) = onehot(y) − softmax(z): one elementwise pass over [B, T, V], where
    # autodiff of log_softmax + take_along_axis builds a scatter, an exp and a divide.
    z, lse, tokens = res
    onehot = jnp.arange(z.shape[-1], dtype=jnp.int32) == tokens[..., None]
    dz = g[..., None] * (onehot.astype(z.dtype) - jnp.exp(z - lse[..., None]))
    return dz, None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)
