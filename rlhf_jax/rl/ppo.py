"""PPO for RLHF: scoring a rollout, advantages, and the update, as pure jit-able functions.

One iteration, as the loop (`ppo_loop.py`) drives it:

    rollout = generate(policy, prompts)                          # generate.py
    exp = score(params, rollout)           # policy/ref logprobs, values, RM scores  [B, R]
    exp = with_advantages(exp, kl_coef)    # KL-shaped rewards → GAE → whitening     [B, R]
    state, metrics = train_step(state, exp, rng)   # epochs × minibatches of clipped PPO

Shapes: B sequences, P prompt width (left-padded), R response width, T = P + R.
Response token r sits at column P + r and is predicted by the logits at column P + r − 1.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from rlhf_jax.train import optim
from rlhf_jax.rl.advantages import (  # noqa: F401 - the public PPO API lives here too
    KLControl,
    KLEstimator,
    clip_rewards,
    gae,
    masked_mean,
    masked_whiten,
    score_with_eos_penalty,
    shape_rewards,
)
from rlhf_jax.config import check
from rlhf_jax.models.sampling import Rollout  # noqa: F401 - what `score` takes
from rlhf_jax.rl.losses import entropy_sum, logprobs_from_logits, policy_loss, value_loss


class ValueKind(str, enum.Enum):
    SEPARATE = "separate"  # a critic of its own, initialised from the reward model
    SHARED = "shared"  # a value head on the policy's trunk


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (defaults follow the common RLHF reference settings).

    Attributes:
      ppo_epochs: passes over each batch of experience.
      num_minibatches: minibatches per pass (a fresh permutation each pass).
      grad_accum: microbatches per minibatch (gradients summed, then one update).
      clip_eps: ε of the clipped surrogate.
      dual_clip: c of dual-clip PPO for negative advantages (None = off).
      value_clip_eps: ε of the clipped value loss (None = unclipped).
      vf_coef: weight of the value loss.
      entropy_coef: weight of the entropy bonus.
      gamma: discount γ of GAE.
      lam: λ of GAE.
      temperature: logits are divided by it, in rollout and training alike.
      kl_estimator: per-token KL estimator in the reward: k1, k2 or k3.
      kl_coef: β of the KL penalty (initial value when adaptive).
      kl_control: fixed β, or adaptive toward `target_kl` (Ziegler et al. 2019).
      target_kl: KL per sequence the adaptive controller aims at.
      kl_horizon: horizon of the adaptive controller, in samples.
      whiten_advantages: normalise advantages over the batch's real tokens.
      whiten_rewards: normalise the shaped rewards before GAE.
      reward_clip: clip RM scores to [−c, c] (None = off).
      missing_eos_penalty: subtracted from the score of a response with no stop token.
      value_kind: separate critic or a value head on the policy trunk.
      rollout_logprobs: take log π_old from the rollout (the sampler's own log-probs of the
        tokens it drew) instead of a policy forward pass in scoring, as TRL does; saves one
        forward of the policy per iteration (separate critic only: a shared value head needs
        that forward for the values). The two agree to float rounding (~1e-6 in float32;
        more in bfloat16, where recomputing is the safer default).
    """

    ppo_epochs: int = 4
    num_minibatches: int = 1
    grad_accum: int = 1
    clip_eps: float = 0.2
    dual_clip: Optional[float] = None
    value_clip_eps: Optional[float] = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    temperature: float = 1.0
    kl_estimator: KLEstimator = KLEstimator.K1
    kl_coef: float = 0.05
    kl_control: KLControl = KLControl.FIXED
    target_kl: float = 6.0
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    reward_clip: Optional[float] = None
    missing_eos_penalty: Optional[float] = None
    value_kind: ValueKind = ValueKind.SEPARATE
    rollout_logprobs: bool = False

    def __post_init__(self):
        check(self.ppo_epochs >= 1, "ppo_epochs", self.ppo_epochs, "1 or more")
        check(self.num_minibatches >= 1, "num_minibatches", self.num_minibatches, "1 or more")
        check(self.grad_accum >= 1, "grad_accum", self.grad_accum, "1 or more")
        check(0 < self.clip_eps < 1, "clip_eps", self.clip_eps, "a number in (0, 1)")
        check(self.dual_clip is None or self.dual_clip > 1, "dual_clip", self.dual_clip,
              "None or a number > 1")
        check(self.temperature > 0, "temperature", self.temperature, "a positive number")
        check(0 <= self.gamma <= 1, "gamma", self.gamma, "a number in [0, 1]")
        check(0 <= self.lam <= 1, "lam", self.lam, "a number in [0, 1]")
        check(self.kl_coef >= 0, "kl_coef", self.kl_coef, "0 or more")
        check(not (self.rollout_logprobs and self.value_kind == ValueKind.SHARED),
              "rollout_logprobs", self.rollout_logprobs,
              "false with value_kind shared (the policy forward is needed for the values)")


@flax.struct.dataclass
class Experience:
    """A scored rollout, ready for the update. Per-token fields are [B, R]."""

    input_ids: jax.Array  # [B, T] prompt (left-padded) + response (right-padded)
    attention_mask: jax.Array  # [B, T]
    response_mask: jax.Array  # [B, R]
    logprobs: jax.Array  # [B, R] of the policy that sampled (at the sampling temperature)
    values: jax.Array  # [B, R] critic values when sampled
    advantages: jax.Array  # [B, R]
    returns: jax.Array  # [B, R]


def policy_logprobs(policy, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                    response_width: int, temperature: float):
    """(log-probs [B, R] of the response tokens at temperature τ, the unscaled logits
    [B, R, V] that predict them, values [B, T] of a shared value head or None).

    log π(y_r | x, y_<r) = log_softmax(logits_{P+r−1} / τ)[y_r]. The LM head runs only on
    those R columns P − 1 … T − 2.
    """
    t = input_ids.shape[1]
    out = policy.apply({"params": params}, input_ids, attention_mask,
                       logit_columns=(t - response_width - 1, t - 1))
    logits, values = out if isinstance(out, tuple) else (out, None)
    tokens = input_ids[:, t - response_width:]
    return logprobs_from_logits(logits, tokens, temperature), logits, values


def critic_values(critic, params: Any, input_ids: jax.Array, attention_mask: jax.Array,
                  response_width: int) -> jax.Array:
    """A separate critic's values [B, R] of the states before each response token."""
    values = critic.apply({"params": params}, input_ids, attention_mask, per_token=True)
    return _before_response(values, response_width)


def _before_response(values: jax.Array, r: int) -> jax.Array:
    # The value of the state before response token r is read at column P + r − 1.
    return values[:, -r - 1 : -1]


def policy_and_values(params: Any, batch: Any, *, policy, critic, cfg: PPOConfig):
    """(logprobs [B, R], values [B, R], response logits [B, R, V]) under the current params."""
    r = batch.response_mask.shape[1]
    ids, mask = batch.input_ids, batch.attention_mask
    logprobs, logits, values = policy_logprobs(policy, params["policy"], ids, mask, r,
                                               cfg.temperature)
    if cfg.value_kind == ValueKind.SHARED:
        values = _before_response(values, r)
    else:
        values = critic_values(critic, params["critic"], ids, mask, r)
    return logprobs, values, logits


def ppo_loss(params: Any, mb: Experience, *, policy, critic, cfg: PPOConfig):
    """Σ over real tokens of  L_clip + c_v·L_V − c_H·H, with its token count and metric sums.

    L_clip = max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(log π − log π_old)   (Schulman 2017)
    L_V    = ½·max((V − R)², (clip(V, V_old ± ε_V) − R)²)
    """
    logprobs, values, logits = policy_and_values(params, mb, policy=policy, critic=critic, cfg=cfg)
    mask = mb.response_mask.astype(jnp.float32)
    pg_sum, count, pg_metrics = policy_loss(
        logprobs, mb.logprobs, mb.advantages, mask, cfg.clip_eps, cfg.dual_clip
    )
    vf_sum, _, vf_metrics = value_loss(values, mb.values, mb.returns, mask, cfg.value_clip_eps)
    if cfg.entropy_coef:
        ent_sum = entropy_sum(logits, mask, cfg.temperature)
    else:  # a metric only: no backward pass through it
        ent_sum = entropy_sum(jax.lax.stop_gradient(logits), mask, cfg.temperature)
    loss = pg_sum + cfg.vf_coef * vf_sum - cfg.entropy_coef * ent_sum
    metrics = {"loss": loss, "policy_loss": pg_sum, "value_loss": vf_sum, "entropy": ent_sum,
               **pg_metrics, **vf_metrics}
    return loss, (count, metrics)


def _minibatches(exp: Experience, key: jax.Array, num: int) -> Experience:
    """A fresh permutation of the rows, split into `num` minibatches: leaves [num, B/num, ...]."""
    perm = jax.random.permutation(key, exp.response_mask.shape[0])
    return optim.split_microbatches(jax.tree_util.tree_map(lambda x: x[perm], exp), num)


def train_step(
    state: optim.TrainState,
    exp: Experience,
    rng: jax.Array,
    *,
    policy,
    critic,
    tx: optax.GradientTransformation,
    cfg: PPOConfig,
) -> tuple[optim.TrainState, dict]:
    """`ppo_epochs` × `num_minibatches` updates of policy and value together.

    `state.params` = {"policy": ..., "critic": ...} (critic absent with a shared value head).
    Epochs and minibatches are nested `lax.scan`s; each epoch draws a new permutation from
    `fold_in(rng, epoch)`. Metrics are means over every minibatch update.
    """
    loss_fn = functools.partial(ppo_loss, policy=policy, critic=critic, cfg=cfg)

    def update(state, mb):
        new_state, metrics, _ = optim.gradient_step(state, loss_fn, mb, tx, cfg.grad_accum)
        return new_state, {**metrics, "finite": metrics["finite"].astype(jnp.float32)}

    def epoch(state, i):
        mbs = _minibatches(exp, jax.random.fold_in(rng, i), cfg.num_minibatches)
        return jax.lax.scan(update, state, mbs)

    state, metrics = jax.lax.scan(epoch, state, jnp.arange(cfg.ppo_epochs))
    out = jax.tree_util.tree_map(jnp.mean, metrics)
    out["finite"] = jnp.min(metrics["finite"])
    return state, out


def score(params: dict, rollout: Rollout, *, policy, critic, reward_model, cfg: PPOConfig) -> dict:
    """The one scoring pass: policy and reference log-probs, values, and RM scores.

    `rollout` is the rollout engine's `generate.Rollout` (or any object with its
    input_ids, attention_mask, response_mask and ended_with_stop; and logprobs with
    `cfg.rollout_logprobs`). `params` = {"policy", "ref", "reward"} plus "critic" for a
    separate critic. Policy and reference log-probs use the sampling temperature; the RM
    reads the last real token.
    """
    r = rollout.response_mask.shape[1]
    ids, mask = rollout.input_ids, rollout.attention_mask
    if cfg.rollout_logprobs:  # the sampler's log π_old; only the critic runs here
        logprobs = jnp.where(rollout.response_mask > 0, rollout.logprobs, 0.0)
        values = critic_values(critic, params["critic"], ids, mask, r)
    else:
        logprobs, values, _ = policy_and_values(params, rollout, policy=policy, critic=critic,
                                                cfg=cfg)
    ref_logprobs = policy_logprobs(policy, params["ref"], ids, mask, r, cfg.temperature)[0]
    scores = reward_model.apply({"params": params["reward"]}, ids, mask)
    return {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "scores": scores}


def with_advantages(
    rollout: Rollout, scored: dict, kl_coef: jax.Array, cfg: PPOConfig
) -> tuple[Experience, dict]:
    """KL-shaped rewards → GAE → (optionally) whitened advantages; per-row stats for logging."""
    mask = rollout.response_mask.astype(jnp.float32)
    scores = scored["scores"]
    scores = clip_rewards(scores, cfg.reward_clip)
    if cfg.missing_eos_penalty is not None:
        scores = score_with_eos_penalty(scores, rollout.ended_with_stop, cfg.missing_eos_penalty)
    rewards, stats = shape_rewards(scores, scored["logprobs"], scored["ref_logprobs"], mask,
                                   kl_coef, cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
    advantages, returns = gae(rewards, scored["values"], mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask) * mask
    exp = Experience(
        input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
        response_mask=rollout.response_mask, logprobs=scored["logprobs"],
        values=scored["values"] * mask, advantages=advantages, returns=returns,
    )
    stats = {**stats, "score": scores, "reward": stats["non_score_reward"] + scores}
    return exp, stats
