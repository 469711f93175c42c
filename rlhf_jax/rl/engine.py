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

from rlhf_jax import models
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
from rlhf_jax.train import optim, throughput

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
    """The jit-compiled phases of one PPO iteration for given modules, each with explicit
    shardings on `mesh` (so that each phase could later run on a mesh of its own).

        rollout = generate(policy params, prompts)                     the rollout engine
        scored  = score(params, rollout)          log π, log π_ref, V, RM scores    ppo.score
        exp     = advantages(rollout, scored, β)  KL-shaped rewards → GAE → whiten
        state   = update(state, exp)              epochs × minibatches, state donated
        β       ← KL controller(KL of the batch)

    Args:
      policy: `CausalLM` (separate critic) or `CausalLMWithValueHead` (`value_kind: shared`).
      critic: a `RewardModel` used per token, or None with a shared value head.
      reward_model: any module with `apply({"params": p}, ids, mask) -> [B]` scores.
      ppo_cfg, sampling: PPO and sampling settings (the same temperature).
      tx: optimizer of policy and critic together.
      eos_token_id, pad_token_id: stop and pad ids of the tokenizer.
      seed: iteration k samples and shuffles with `fold_in(key(seed), k)`.
      mesh: where the state lives (default: one device). Params and prompts passed in must be
        placed on it (`rlhf_jax.sharding`), and calls made inside `sharding.use_mesh(mesh)`.
    """

    def __init__(self, policy, critic, reward_model, ppo_cfg: ppo.PPOConfig,
                 sampling: SamplingConfig, tx: optax.GradientTransformation,
                 eos_token_id: Optional[int], pad_token_id: int, seed: int = 0, mesh=None):
        self.policy, self.critic, self.reward_model = policy, critic, reward_model
        self.ppo_cfg, self.sampling, self.pad_id, self.tx = ppo_cfg, sampling, pad_token_id, tx
        self.key = jax.random.key(seed)
        self.mesh = mesh if mesh is not None else shd.make_mesh((1, 1, 1), jax.devices()[:1])
        rows, replicated = shd.batch_sharding(self.mesh, 1), shd.replicated(self.mesh)
        trained = {"policy": models.abstract_params(policy)}
        if critic is not None:
            trained["critic"] = models.abstract_params(critic)
        self.state_shardings = optim.state_shardings(trained, tx, self.mesh)
        self.generate = make_generate_fn(policy, sampling, eos_token_id=eos_token_id,
                                         pad_token_id=pad_token_id)
        # A sharding with one axis named is a prefix for any rank: rows split, the rest whole.
        self.score = jax.jit(functools.partial(ppo.score, policy=policy, critic=critic,
                                               reward_model=reward_model, cfg=ppo_cfg),
                             out_shardings=rows)
        self.advantages = jax.jit(functools.partial(_advantages, cfg=ppo_cfg),
                                  out_shardings=(rows, rows, replicated))
        self.update = jax.jit(functools.partial(ppo.train_step, policy=policy, critic=critic,
                                                tx=tx, cfg=ppo_cfg),
                              in_shardings=(self.state_shardings, rows, replicated),
                              out_shardings=(self.state_shardings, replicated),
                              donate_argnums=0)
        self.eval_rows = jax.jit(functools.partial(_eval_rows, policy=policy,
                                                   reward_model=reward_model, cfg=ppo_cfg),
                                 out_shardings=rows)

    def init_state(self, params: dict) -> PPOState:
        """The starting state for params {"policy", "critic"?} placed on the mesh: optimizer
        moments created sharded like the params they follow, never whole on one device."""
        with shd.use_mesh(self.mesh):
            train = jax.jit(lambda p: optim.create_state(p, self.tx),
                            out_shardings=self.state_shardings)(params)
        return PPOState(train=train, kl=init_kl_controller(self.ppo_cfg.kl_coef))

    def iteration(self, state: PPOState, frozen: dict, prompt_ids, prompt_mask,
                  index: int) -> tuple[PPOState, dict, Rollout, jax.Array]:
        """One rollout + update. `frozen` = {"ref": params, "reward": params}.

        Returns (new state, host metrics, the rollout, RM scores [B]). Each phase is timed
        once its results are ready.
        """
        key = jax.random.fold_in(self.key, index)
        clock = _Clock()
        rollout = clock("generate", self.generate(state.train.params["policy"], prompt_ids,
                                                  prompt_mask, jax.random.fold_in(key, 0)))
        scored = clock("score", self.score({**state.train.params, **frozen}, rollout))
        exp, scores, stats = clock("advantages", self.advantages(rollout, scored, state.kl.coef))
        kl_coef = state.kl.coef
        train, update_metrics = clock("update", self.update(state.train, exp,
                                                            jax.random.fold_in(key, 1)))
        cfg = self.ppo_cfg
        kl_state = update_kl_controller(state.kl, stats["kl"], prompt_ids.shape[0],
                                        cfg.kl_control, cfg.target_kl, cfg.kl_horizon)
        host = jax.device_get({**stats, **update_metrics})
        new_tokens = float(host["response_length"]) * prompt_ids.shape[0]
        metrics = {
            **{f"env/{k}": float(v) for k, v in host.items() if k in stats},
            **{f"ppo/{k}": float(v) for k, v in host.items() if k not in stats},
            "env/kl_coef": float(kl_coef),
            **{f"time/{k}": v for k, v in clock.seconds.items()},
            "perf/generated_tokens_per_s": new_tokens / max(clock.seconds["generate"], 1e-9),
            "perf/tokens_per_s": new_tokens / max(clock.total(), 1e-9),
        }
        return PPOState(train=train, kl=kl_state), metrics, rollout, scores

    def iteration_flops(self, rows: int, prompt_width: int, steps: int) -> float:
        """Model FLOPs of one iteration on `rows` prompts of `prompt_width` whose rollout took
        `steps` decode steps: generation; the scoring forwards of the reference, the policy
        (unless the rollout's log-probs stand in), the critic and the reward model; then
        `ppo_epochs` forward + backward passes of policy and critic (see
        `rlhf_jax.train.throughput`). A reward given as a module without a config costs 0."""
        cfg, r = self.ppo_cfg, self.sampling.max_new_tokens
        t, policy = prompt_width + r, self.policy.cfg
        policy_forwards = 1 if cfg.rollout_logprobs else 2
        flops = (throughput.generate_flops(policy, rows, prompt_width, steps)
                 + policy_forwards * throughput.forward_flops(policy, rows, t, r)
                 + cfg.ppo_epochs * throughput.training_flops(policy, rows, t, r))
        if self.critic is not None:
            flops += (throughput.forward_flops(self.critic.cfg, rows, t, 0)
                      + cfg.ppo_epochs * throughput.training_flops(self.critic.cfg, rows, t, 0))
        reward_cfg = getattr(self.reward_model, "cfg", None)
        if reward_cfg is not None:
            flops += throughput.forward_flops(reward_cfg, rows, t, 0)
        return flops

    def evaluate(self, policy_params, frozen: dict, prompts: Prompts, batch_size: int) -> dict:
        """Mean RM score, KL to the reference and response length over every held-out prompt,
        sampled with a fixed key (so evaluations at different iterations are comparable)."""
        totals = np.zeros(4)
        for n, lo in enumerate(range(0, len(prompts), batch_size)):
            rows = prompts.ids[lo:lo + batch_size]
            ids, mask = pad_prompts(rows, self.sampling.prompt_bucket, self.pad_id, batch_size)
            ids, mask = shd.shard_batch((ids, mask), self.mesh)
            rollout = self.generate(policy_params, ids, mask,
                                    jax.random.fold_in(jax.random.key(EVAL_SEED), n))
            scores, kl = jax.device_get(self.eval_rows(policy_params, frozen, rollout))
            lengths = jax.device_get(rollout.lengths)
            real = len(rows)
            totals += [scores[:real].sum(), kl[:real].sum(), lengths[:real].sum(), real]
        n = max(totals[3], 1)
        return {"score": totals[0] / n, "kl": totals[1] / n, "response_length": totals[2] / n}


def _advantages(rollout: Rollout, scored: dict, kl_coef, cfg: ppo.PPOConfig):
    """(experience, RM scores [B], scalar stats of the batch): `ppo.with_advantages` and the
    numbers logged about it."""
    exp, stats = ppo.with_advantages(rollout, scored, kl_coef, cfg)
    return exp, stats["score"], _iteration_stats(rollout, exp, stats)


def _eval_rows(policy_params, frozen: dict, rollout: Rollout, *, policy, reward_model,
               cfg: ppo.PPOConfig):
    """(RM scores [B], Σ_t KL_t to the reference [B]) of a rollout."""
    r = rollout.response_mask.shape[1]
    ids, mask = rollout.input_ids, rollout.attention_mask

    def logprobs(params):
        return ppo.policy_logprobs(policy, params, ids, mask, r, cfg.temperature)[0]

    kl = per_token_kl(logprobs(policy_params), logprobs(frozen["ref"]), cfg.kl_estimator)
    kl = jnp.sum(jnp.where(rollout.response_mask > 0, kl, 0.0), axis=1)
    return reward_model.apply({"params": frozen["reward"]}, ids, mask), kl


class _Clock:
    """Seconds per phase: `clock(name, outputs)` waits for the outputs, then books the time
    since the previous phase ended."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def __call__(self, name: str, outputs):
        jax.block_until_ready(outputs)
        now = time.perf_counter()
        self.seconds[name], self.last = now - self.last, now
        return outputs

    def total(self) -> float:
        return sum(self.seconds.values())
