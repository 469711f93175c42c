"""From a scored rollout to advantages: masked statistics, KL-shaped rewards, GAE, KL control.

Every function is pure and jit-able; loops over time are `lax.scan`s.

Shapes: B responses, T response tokens. `mask` [B, T] is 1 at real response tokens. A
response is a prefix of its row (padding after it; an all-zero row is an empty response);
the functions below stay correct when a mask has holes, and values at masked positions
(garbage, NaN) never reach a result. Statistics are computed in float32.
"""

from __future__ import annotations

import enum
from typing import Optional, Union

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


def _f32(x) -> Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


# ---------------------------------------------------------------------------------------------
# Masked statistics.


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
    """Σ x over real positions: Σ_i m_i·x_i (masked values never enter, even NaN).

    Args:
      x: [B, T] (any shape that `mask` broadcasts to).
      mask: [B, T], 1 at real positions.
      axis: reduced axes (None = all).
    """
    return jnp.sum(jnp.where(mask > 0, _f32(x), 0.0), axis=axis)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    """Σ m·x / Σ m over real positions; 0 where there is none (an empty row, an empty batch).

    Args:
      x, mask: [B, T].
      axis: None for the mean over every real token of the batch, 1 for one per row [B].
    """
    count = jnp.sum(mask > 0, axis=axis).astype(jnp.float32)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
    """Variance over every real position of the batch (a scalar).

        μ = masked_mean(x),   σ² = Σ m·(x − μ)² / Σ m,   ×  n / (n − 1) when `unbiased`

    with n = Σ m (Bessel's correction, as the reference implementations apply it). n ≤ 1
    gives 0 instead of a division by zero.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((_f32(x) - mean) ** 2, mask)
    if unbiased:
        n = jnp.sum(mask > 0).astype(jnp.float32)
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def masked_whiten(x: Array, mask: Array, shift_mean: bool = True) -> Array:
    """Whitening over every real token of the batch (advantage / reward normalisation).

        x̂ = (x − μ) / sqrt(σ² + 1e-8)            (μ, unbiased σ² from masked_mean / masked_var)
        x̂ += μ                                    when not shift_mean (scale only)

    Args:
      x, mask: [B, T].
    Returns:
      [B, T] float32, 0 at masked positions.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (_f32(x) - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return jnp.where(mask > 0, white, 0.0)


# ---------------------------------------------------------------------------------------------
# Per-token KL estimators (Schulman, "Approximating KL divergence", 2020).
# Samples y ~ π; with r = π_ref(y) / π(y), each estimates KL(π ‖ π_ref) = E_π[−log r].


class KLEstimator(str, enum.Enum):
    K1 = "k1"  # −log r: unbiased, high variance, can be negative
    K2 = "k2"  # ½ (log r)²: biased, low variance, ≥ 0
    K3 = "k3"  # (r − 1) − log r: unbiased, low variance, ≥ 0
    ABS = "abs"  # |log r|: biased, ≥ 0 (TRL's "abs")


def kl_k1(logprobs: Array, ref_logprobs: Array) -> Array:
    """k1 = −log r = log π − log π_ref."""
    return logprobs - ref_logprobs


def kl_k2(logprobs: Array, ref_logprobs: Array) -> Array:
    """k2 = ½ (log r)²."""
    return 0.5 * (ref_logprobs - logprobs) ** 2


def kl_k3(logprobs: Array, ref_logprobs: Array) -> Array:
    """k3 = (r − 1) − log r, with r − 1 = expm1(log r) (exact near r = 1)."""
    log_r = ref_logprobs - logprobs
    return jnp.expm1(log_r) - log_r


def kl_abs(logprobs: Array, ref_logprobs: Array) -> Array:
    """|log r|."""
    return jnp.abs(logprobs - ref_logprobs)


_KL_ESTIMATORS = {KLEstimator.K1: kl_k1, KLEstimator.K2: kl_k2, KLEstimator.K3: kl_k3,
                  KLEstimator.ABS: kl_abs}


def per_token_kl(logprobs: Array, ref_logprobs: Array,
                 estimator: Union[KLEstimator, str] = KLEstimator.K1) -> Array:
    """KL_t [B, T]: the chosen estimator at each sampled token (not masked).

    Args:
      logprobs: [B, T] log π(y_t | ·) of the sampling policy.
      ref_logprobs: [B, T] log π_ref(y_t | ·) of the reference.
      estimator: a `KLEstimator` or its value ("k1", "k2", "k3", "abs").
    """
    return _KL_ESTIMATORS[KLEstimator(estimator)](logprobs, ref_logprobs)


# ---------------------------------------------------------------------------------------------
# Scores and KL-shaped rewards.


def score_with_eos_penalty(scores: Array, has_stop_token: Array, penalty: float) -> Array:
    """s ← s − penalty for each response that never produced a stop token (cut at max length).

    Subtracts, as TRL's `missing_eos_penalty` does, so the RM's ranking among unfinished
    responses survives. (The older variant replaced the score by a constant,
    `jnp.where(has_stop_token, scores, value)`; it is not offered.)

    Args:
      scores: [B] RM scores.
      has_stop_token: [B] bool.
      penalty: a non-negative number, subtracted.
    """
    return jnp.where(has_stop_token, scores, scores - penalty)


def clip_rewards(x: Array, limit: Optional[float]) -> Array:
    """clip(x, −limit, limit) elementwise; `limit` None returns x unchanged."""
    return x if limit is None else jnp.clip(x, -limit, limit)


def shape_rewards(
    scores: Array,
    logprobs: Array,
    ref_logprobs: Array,
    mask: Array,
    kl_coef: Union[float, Array],
    estimator: Union[KLEstimator, str] = KLEstimator.K1,
) -> tuple[Array, dict]:
    """Per-token rewards with the KL penalty (Ziegler et al. 2019; Stiennon et al. 2020).

        r_t = −β·KL_t + [t = last real token]·s          at real tokens, 0 at padding

    so that Σ_t r_t = s − β·Σ_t KL_t: the RM score s arrives once the response is complete.
    An empty response gets no reward at all (its score is dropped).

    Args:
      scores: [B] RM scores (after any penalty, normalisation or clipping).
      logprobs, ref_logprobs: [B, T] of the sampling policy and of the reference.
      mask: [B, T].
      kl_coef: β, a number or a traced scalar (the KL controller's coefficient).
      estimator: how KL_t is estimated (`KLEstimator`).
    Returns:
      (rewards [B, T] float32, {"kl": [B] Σ_t KL_t, "non_score_reward": [B] −β·Σ_t KL_t}).
    """
    real = mask > 0
    kl = jnp.where(real, per_token_kl(_f32(logprobs), _f32(ref_logprobs), estimator), 0.0)
    non_score = -kl_coef * kl  # [B, T]
    t = jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :]
    last = jnp.max(jnp.where(real, t, -1), axis=1, keepdims=True)  # [B, 1], -1 if empty
    is_last = t == last  # [B, T], all False for an empty response
    rewards = non_score + jnp.where(is_last, _f32(scores)[:, None], 0.0)
    return rewards, {"kl": jnp.sum(kl, axis=1), "non_score_reward": jnp.sum(non_score, axis=1)}


# ---------------------------------------------------------------------------------------------
# Generalised advantage estimation (Schulman et al. 2015).


def gae(rewards: Array, values: Array, mask: Array, gamma: float,
        lam: float) -> tuple[Array, Array]:
    """Advantages and returns by a reverse `lax.scan` over the response.

        δ_t = r_t + γ·V_{t+1} − V_t
        A_t = δ_t + γλ·A_{t+1}
        R_t = A_t + V_t                      (the value target)

    The episode ends with the response: after the last real token V_{t+1} = A_{t+1} = 0
    (no bootstrapping into padding). Masked positions are not time steps: their rewards and
    values are ignored, they get A = R = 0, and the recursion passes over them (a hole in the
    mask links the real tokens on either side).

    Args:
      rewards: [B, T] per-token rewards (e.g. from `shape_rewards`).
      values: [B, T] V(s_t), the critic's value before token t is chosen.
      mask: [B, T].
      gamma: discount γ; lam: λ of GAE (numbers or traced scalars).
    Returns:
      (advantages [B, T], returns [B, T]), float32, 0 at masked positions.
    """
    real = (mask > 0).T  # [T, B]: the scan runs over time
    rewards = jnp.where(real, _f32(rewards).T, 0.0)
    values = jnp.where(real, _f32(values).T, 0.0)

    def step(carry, xs):
        next_value, next_adv = carry  # of the next real token; 0 past the end  [B]
        r, v, m = xs
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return carry, jnp.where(m, adv, 0.0)

    zeros = jnp.zeros(rewards.shape[1], jnp.float32)
    _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards, values, real), reverse=True)
    return advantages.T, jnp.where(real, advantages + values, 0.0).T


# ---------------------------------------------------------------------------------------------
# KL coefficient control: β of the penalty, fixed or adapted toward a target KL.


class KLControl(str, enum.Enum):
    FIXED = "fixed"
    ADAPTIVE = "adaptive"  # proportional control (Ziegler et al. 2019)


@flax.struct.dataclass
class KLControllerState:
    """The KL coefficient β as a pytree (checkpointed with the run; settings stay in config).

    Attributes:
      coef: β, a float32 scalar.
    """

    coef: Array


def init_kl_controller(coef: float) -> KLControllerState:
    """The state holding the initial β."""
    return KLControllerState(coef=jnp.asarray(coef, jnp.float32))


def fixed_kl_update(state: KLControllerState, kl: Array, n_steps, target: float,
                    horizon: float) -> KLControllerState:
    """β stays where it is."""
    del kl, n_steps, target, horizon
    return state


def adaptive_kl_update(state: KLControllerState, kl: Array, n_steps, target: float,
                       horizon: float) -> KLControllerState:
    """Proportional control toward the target KL (Ziegler et al. 2019, §2.2).

        e = clip(KL / KL_target − 1, −0.2, 0.2)
        β ← β·(1 + e·n_steps / horizon)

    Args:
      state: the current β.
      kl: mean over the batch of the per-response KL Σ_t KL_t (`shape_rewards`' "kl").
      n_steps: samples in that batch (the controller's clock, as in the reference code).
      target: KL_target per response.
      horizon: samples over which a constant error e moves β by a factor of about exp(e).
    """
    error = jnp.clip(_f32(kl) / target - 1.0, -0.2, 0.2)
    return state.replace(coef=state.coef * (1.0 + error * n_steps / horizon))


_KL_UPDATES = {KLControl.FIXED: fixed_kl_update, KLControl.ADAPTIVE: adaptive_kl_update}


def update_kl_controller(state: KLControllerState, kl: Array, n_steps,
                         control: Union[KLControl, str], target: float,
                         horizon: float) -> KLControllerState:
    """One controller update after a batch, by the chosen `KLControl` (see the two above)."""
    return _KL_UPDATES[KLControl(control)](state, kl, n_steps, target, horizon)
