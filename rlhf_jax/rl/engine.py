"""The PPO engine: one iteration's jit-compiled programs (generate → score and advantages →
update → KL controller), for given modules, drivable by any loop.

`rlhf_jax.stages.ppo` drives it with checkpoints, logging and export; the demo and the tests
drive it directly (the tests with a rule-based reward).
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import sharding as shd
from rlhf_jax.data.prompts import Prompts
from rlhf_jax.models.sampling import Rollout, SamplingConfig, make_generate_fn, pad_prompts
from rlhf_jax.rl import ppo
from rlhf_jax.rl.advantages import (
    KLControllerState,
    init_kl_controller,
    masked_mean,
    masked_var,
    per_token_kl,
    update_kl_controller,
)
from rlhf_jax.train import optim

EVAL_SEED = 1234  # held-out prompts are sampled with this key at every evaluation


@flax.struct.dataclass
class PPOState:
    """Everything a PPO run trains or adapts: checkpointed as one pytree."""

    train: optim.TrainState  # params {"policy", "critic"?} and their optimizer state
    kl: KLControllerState


def _iteration_stats(rollout: Rollout, exp: ppo.Experience, stats: dict) -> dict:
    """Scalars of one scored batch: means over responses, and over tokens where per token."""
    mask = exp.response_mask.astype(jnp.float32)
    residual_var = masked_var(exp.returns - exp.values, mask)
    explained = 1.0 - residual_var / jnp.maximum(masked_var(exp.returns, mask), 1e-8)
    return {
        "score": jnp.mean(stats["score"]),
        "score_std": jnp.std(stats["score"]),
        "kl": jnp.mean(stats["kl"]),
        "non_score_reward": jnp.mean(stats["non_score_reward"]),
        "reward": jnp.mean(stats["reward"]),
        "response_length": jnp.mean(rollout.lengths.astype(jnp.float32)),
        "stopped": jnp.mean(rollout.ended_with_stop.astype(jnp.float32)),
        "value_mean": masked_mean(exp.values, mask),
        "return_mean": masked_mean(exp.returns, mask),
        "explained_variance": explained,
    }


class PPOEngine:
    """The jit-compiled programs of one PPO iteration for given modules.

    Args:
      policy: `CausalLM` (separate critic) or `CausalLMWithValueHead` (`value_kind: shared`).
      critic: a `RewardModel` used per token, or None with a shared value head.
      reward_model: any module with `apply({"params": p}, ids, mask) -> [B]` scores.
      ppo_cfg, sampling: PPO and sampling settings (the same temperature).
      tx: optimizer of policy and critic together.
      eos_token_id, pad_token_id: stop and pad ids of the tokenizer.
      seed: iteration k samples and shuffles with `fold_in(key(seed), k)`.
    """

    def __init__(self, policy, critic, reward_model, ppo_cfg: ppo.PPOConfig,
                 sampling: SamplingConfig, tx: optax.GradientTransformation,
                 eos_token_id: Optional[int], pad_token_id: int, seed: int = 0):
        self.ppo_cfg, self.sampling, self.pad_id = ppo_cfg, sampling, pad_token_id
        self.key = jax.random.key(seed)
        self.generate = make_generate_fn(policy, sampling, eos_token_id=eos_token_id,
                                         pad_token_id=pad_token_id)
        score = functools.partial(ppo.score, policy=policy, critic=critic,
                                  reward_model=reward_model, cfg=ppo_cfg)

        def score_and_advantages(params, rollout, kl_coef):
            exp, stats = ppo.with_advantages(rollout, score(params, rollout), kl_coef, ppo_cfg)
            return exp, stats["score"], _iteration_stats(rollout, exp, stats)

        self.score = jax.jit(score_and_advantages)
        self.update = jax.jit(functools.partial(ppo.train_step, policy=policy, critic=critic,
                                                tx=tx, cfg=ppo_cfg), donate_argnums=0)

        def eval_rows(policy_params, frozen, rollout):
            """(RM scores [B], Σ_t KL_t to the reference [B]) of a rollout."""
            r = rollout.response_mask.shape[1]
            ids, mask = rollout.input_ids, rollout.attention_mask

            def logprobs(params):
                return ppo.policy_logprobs(policy, params, ids, mask, r, ppo_cfg.temperature)[0]

            kl = per_token_kl(logprobs(policy_params), logprobs(frozen["ref"]),
                              ppo_cfg.kl_estimator)
            kl = jnp.sum(jnp.where(rollout.response_mask > 0, kl, 0.0), axis=1)
            return reward_model.apply({"params": frozen["reward"]}, ids, mask), kl

        self.eval_rows = jax.jit(eval_rows)

    def init_state(self, params: dict, tx: optax.GradientTransformation) -> PPOState:
        """The starting state for params {"policy", "critic"?} (placed where they should be)."""
        return PPOState(train=jax.jit(lambda p: optim.create_state(p, tx))(params),
                        kl=init_kl_controller(self.ppo_cfg.kl_coef))

    def iteration(self, state: PPOState, frozen: dict, prompt_ids, prompt_mask,
                  index: int) -> tuple[PPOState, dict, Rollout, jax.Array]:
        """One rollout + update. `frozen` = {"ref": params, "reward": params}.

        Returns (new state, host metrics, the rollout, RM scores [B]). Times per phase are
        measured after each phase's results are ready.
        """
        key = jax.random.fold_in(self.key, index)
        t0 = time.perf_counter()
        rollout = self.generate(state.train.params["policy"], prompt_ids, prompt_mask,
                                jax.random.fold_in(key, 0))
        jax.block_until_ready(rollout)
        t1 = time.perf_counter()
        exp, scores, stats = self.score({**state.train.params, **frozen}, rollout, state.kl.coef)
        jax.block_until_ready(exp)
        t2 = time.perf_counter()
        kl_coef = state.kl.coef
        train, update_metrics = self.update(state.train, exp, jax.random.fold_in(key, 1))
        jax.block_until_ready(train)
        t3 = time.perf_counter()
        cfg = self.ppo_cfg
        kl_state = update_kl_controller(state.kl, stats["kl"], prompt_ids.shape[0],
                                        cfg.kl_control, cfg.target_kl, cfg.kl_horizon)
        host = jax.device_get({**stats, **update_metrics})
        new_tokens = float(host["response_length"]) * prompt_ids.shape[0]
        metrics = {
            **{f"env/{k}": float(v) for k, v in host.items() if k in stats},
            **{f"ppo/{k}": float(v) for k, v in host.items() if k not in stats},
            "env/kl_coef": float(kl_coef),
            "time/generate": t1 - t0,
            "time/score": t2 - t1,
            "time/update": t3 - t2,
            "perf/generated_tokens_per_s": new_tokens / max(t1 - t0, 1e-9),
            "perf/tokens_per_s": new_tokens / max(t3 - t0, 1e-9),
        }
        return PPOState(train=train, kl=kl_state), metrics, rollout, scores

    def evaluate(self, policy_params, frozen: dict, prompts: Prompts, batch_size: int,
                 mesh=None) -> dict:
        """Mean RM score, KL to the reference and response length over every held-out prompt,
        sampled with a fixed key (so evaluations at different iterations are comparable)."""
        totals = np.zeros(4)
        for n, lo in enumerate(range(0, len(prompts), batch_size)):
            rows = prompts.ids[lo:lo + batch_size]
            ids, mask = pad_prompts(rows, self.sampling.prompt_bucket, self.pad_id, batch_size)
            if mesh is not None:
                ids, mask = shd.shard_batch((ids, mask), mesh)
            rollout = self.generate(policy_params, ids, mask,
                                    jax.random.fold_in(jax.random.key(EVAL_SEED), n))
            scores, kl = jax.device_get(self.eval_rows(policy_params, frozen, rollout))
            lengths = jax.device_get(rollout.lengths)
            real = len(rows)
            totals += [scores[:real].sum(), kl[:real].sum(), lengths[:real].sum(), real]
        n = max(totals[3], 1)
        return {"score": totals[0] / n, "kl": totals[1] / n, "response_length": totals[2] / n}
