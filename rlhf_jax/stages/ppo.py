"""`rlhf-jax ppo`: PPO against a reward model, as a job of the shared run frame.

Each iteration, on the device mesh (the phases are `rlhf_jax.rl.engine.PPOEngine`'s):

    prompts  → generate (policy, KV cache, one while_loop)              models/sampling.py
             → score: policy / reference log-probs, values, RM scores   rl.ppo.score
             → advantages: KL-shaped rewards → GAE → whitening           rl.ppo.with_advantages
             → update: ppo_epochs × minibatches of clipped updates       rl.ppo.train_step
             → KL controller update (fixed or adaptive)

`rlhf_jax.train.loop.run` does the rest as for every stage (resume, guards, saves, metrics,
held-out evaluation, export). RNG: iteration k uses `fold_in(key(seed), k)`, and prompt batch
k is a pure function of (seed, k), so a resumed run continues exactly.

    rlhf-jax ppo --config configs/ppo_tiny.yaml iterations=50 out_dir=runs/ppo
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from rlhf_jax import models, perf
from rlhf_jax import sharding as shd
from rlhf_jax.config import ConfigError, check
from rlhf_jax.data.prompts import PromptDataConfig, load_prompts
from rlhf_jax.models.sampling import SamplingConfig, pad_prompts
from rlhf_jax.rl import ppo
from rlhf_jax.rl.engine import PPOEngine
from rlhf_jax.train import optim
from rlhf_jax.train.logging import drop_rows_after, format_table
from rlhf_jax.train.loop import RunConfig, command, run
from rlhf_jax.train.model_source import (
    check_vocab, load_model, require_model_dir, tokenizer_for,
)
from rlhf_jax.train.optim import OptimizerConfig
from rlhf_jax.train.throughput import Work

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PPORunConfig(RunConfig):
    """A PPO run: the fields of `rlhf_jax.train.loop.RunConfig` (batch_size counts prompts
    per iteration; optim trains policy and critic together) and

    Attributes:
      policy: Hugging Face causal-LM directory (the SFT model); also the reference model.
      reward_model: Hugging Face sequence-classification directory (ours or transformers').
      critic: directory the separate critic starts from (none = `reward_model`, as the
        reference implementations do); unused with `ppo.value_kind: shared`.
      model: (of RunConfig) its tokenizer defaults to `policy`'s; dtype, remat and
        scan_layers apply to all four models.
      prompts: the prompt dataset.
      sampling: how responses are sampled (its temperature must equal ppo.temperature).
      ppo: PPO hyper-parameters (rlhf_jax.rl.ppo.PPOConfig).
      iterations: PPO iterations (rollout + update).
      sample_every: log a table of prompts, responses and scores every this many
        iterations (0 = never); rows go to out_dir/samples.jsonl.
      num_logged_samples: rows of that table.
    """

    out_dir: str = "runs/ppo"
    optim: OptimizerConfig = OptimizerConfig(learning_rate=1e-5)
    batch_size: int = 16
    log_every: int = 1
    policy: str = ""
    reward_model: str = ""
    critic: Optional[str] = None
    prompts: PromptDataConfig = PromptDataConfig(train="prompts.jsonl")
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=32)
    ppo: ppo.PPOConfig = ppo.PPOConfig()
    iterations: int = 100
    sample_every: int = 10
    num_logged_samples: int = 4

    def __post_init__(self):
        super().__post_init__()
        check(bool(self.policy), "policy", self.policy,
              "a Hugging Face causal-LM directory (config.json + *.safetensors)")
        check(bool(self.reward_model), "reward_model", self.reward_model,
              "a Hugging Face sequence-classification directory")
        check(self.sampling.temperature == self.ppo.temperature, "sampling.temperature",
              self.sampling.temperature,
              f"the same value as ppo.temperature={self.ppo.temperature} (the update must score "
              "responses with the distribution that sampled them)")
        per_update = self.ppo.num_minibatches * self.ppo.grad_accum
        check(self.batch_size % per_update == 0, "batch_size", self.batch_size,
              f"a positive multiple of ppo.num_minibatches × ppo.grad_accum = {per_update}")
        check(self.iterations >= 1, "iterations", self.iterations, "1 or more")
        check(self.sample_every >= 0, "sample_every", self.sample_every, "0 (never) or more")


CONFIG_CLASS = PPORunConfig

# ----------------------------------------------------------------------------- setup


def load_models(cfg: PPORunConfig, tokenizer, mesh):
    """(policy, critic or None, reward model, params {"policy", "critic"?}, frozen {"ref",
    "reward"}), every param placed on `mesh`. The reference is a copy of the starting policy."""
    shared = cfg.ppo.value_kind == ppo.ValueKind.SHARED
    policy, policy_params = load_model(cfg.model, cfg.policy, tokenizer, mesh, cfg.seed,
                                       "lm+value" if shared else "lm")
    reward_model, reward_params = load_model(cfg.model, cfg.reward_model, tokenizer, mesh, 0,
                                             "reward")
    params = {"policy": policy_params}
    critic = None
    if not shared:
        critic, params["critic"] = load_model(cfg.model, cfg.critic or cfg.reward_model,
                                              tokenizer, mesh, 0, "reward")
    ref = jax.tree_util.tree_map(jnp.copy, policy_params)
    return policy, critic, reward_model, params, {"ref": ref, "reward": reward_params}


def _check_prompt_room(cfg: PPORunConfig, policy) -> None:
    room = policy.cfg.max_position_embeddings - cfg.sampling.max_new_tokens
    if cfg.prompts.max_prompt_length > room:
        raise ConfigError("prompts.max_prompt_length", "config keys prompts.max_prompt_length="
                          f"{cfg.prompts.max_prompt_length} + sampling.max_new_tokens="
                          f"{cfg.sampling.max_new_tokens} exceed the policy's "
                          f"{policy.cfg.max_position_embeddings} positions; lower one of them")


class PPOJob:
    """PPO set up for a run: prompts, the four models, the engine and its sharded state.

    `on_iteration(iteration, prompts, responses)` (texts of the batch) may return extra
    metrics to log with the iteration's, e.g. a score by a judge the RM only approximates.
    """

    def __init__(self, cfg: PPORunConfig, mesh, log: Callable[[str], None],
                 on_iteration: Optional[Callable[[int, list, list], dict]] = None):
        for key in ("policy", "reward_model", "critic"):
            require_model_dir(key, getattr(cfg, key))
        self.cfg, self.mesh, self.log, self.on_iteration = cfg, mesh, log, on_iteration
        self.tokenizer = tokenizer_for(cfg.model, cfg.policy)
        self.prompts, self.held_out = load_prompts(cfg.prompts, self.tokenizer, cfg.seed,
                                                   batch_size=cfg.batch_size)
        for part in (self.prompts, self.held_out):
            if part is not None:
                log(part.summary)
        self.policy, critic, reward_model, params, self.frozen = load_models(
            cfg, self.tokenizer, mesh)
        check_vocab(self.tokenizer, self.policy, critic, reward_model)
        _check_prompt_room(cfg, self.policy)
        pad = self.tokenizer.pad_token_id
        self.pad = int((pad if pad is not None else self.tokenizer.eos_token_id) or 0)
        tx = optim.make_optimizer(cfg.optim, cfg.iterations * cfg.ppo.ppo_epochs
                                  * cfg.ppo.num_minibatches)
        self.engine = PPOEngine(self.policy, critic, reward_model, cfg.ppo, cfg.sampling, tx,
                                self.tokenizer.eos_token_id, self.pad, cfg.seed, mesh)
        self.state = self.engine.init_state(params)
        self.total, self.unit, self.postfix = cfg.iterations, "iteration", ("env/score", "env/kl")
        self.samples_path = os.path.join(cfg.out_dir, "samples.jsonl")
        self.last: dict = {}
        self._started = False
        self._shape = self._steps = 0

    def step(self, state, k: int):
        if not self._started and jax.process_index() == 0:
            drop_rows_after(self.samples_path, k - 1, key="iteration")  # a fresh or resumed run
        self._started = True
        rows = self.prompts.batch_rows(k - 1, self.cfg.batch_size)
        ids, mask = pad_prompts([self.prompts.ids[r] for r in rows],
                                self.cfg.sampling.prompt_bucket, self.pad)
        self._shape = ids.shape[1]
        ids, mask = shd.shard_batch((ids, mask), self.mesh)
        state, metrics, rollout, scores = self.engine.iteration(state, self.frozen, ids, mask, k)
        self._steps = int(rollout.num_steps)
        if self.on_iteration is not None:
            texts = self._sample_rows(rows, rollout, scores, len(rows))
            metrics.update(self.on_iteration(k, [t["prompt"] for t in texts],
                                             [t["response"] for t in texts]))
        every = self.cfg.sample_every
        if every and k % every == 0 and jax.process_index() == 0:
            self._write_samples(k, self._sample_rows(rows, rollout, scores,
                                                     self.cfg.num_logged_samples))
        self.last = metrics
        return state, metrics

    def work(self, k: int):
        flops = self.engine.iteration_flops(self.cfg.batch_size, self._shape, self._steps)
        return Work(self._shape, flops)

    def log_row(self, k: int, metrics: dict) -> dict:
        return metrics

    def evaluate(self, state) -> dict:
        if self.held_out is None:
            return {}
        return self.engine.evaluate(state.train.params["policy"], self.frozen, self.held_out,
                                    self.cfg.batch_size)

    def finish(self, state) -> dict:
        return {}

    def export(self, state, directory: str) -> None:
        models.save_hf(directory, self.policy, state.train.params["policy"], self.tokenizer)

    def _sample_rows(self, rows, rollout, scores, n: int) -> list[dict]:
        tokens, lengths, scores = jax.device_get((rollout.tokens, rollout.lengths, scores))
        return [{"prompt": self.prompts.texts[int(rows[i])],
                 "response": self.tokenizer.decode(tokens[i, :int(lengths[i])],
                                                   skip_special_tokens=True),
                 "score": float(scores[i])} for i in range(min(n, len(rows)))]

    def _write_samples(self, k: int, table: list[dict]) -> None:
        with open(self.samples_path, "a", encoding="utf-8") as f:
            for row in table:
                f.write(json.dumps({"iteration": k, **row}) + "\n")
        self.log(f"iteration {k} samples:\n" + format_table(table))


def train(cfg: PPORunConfig, log: Callable[[str], None] = print, progress_desc: str = "ppo",
          on_iteration: Optional[Callable[[int, list, list], dict]] = None) -> dict:
    """Runs (or resumes) PPO as `cfg` says; returns the last iteration's metrics ("last") and
    the held-out evaluation ("eval").

    Writes to cfg.out_dir what every stage writes (see `rlhf_jax.train.loop.run`: config,
    checkpoints of policy, critic, optimizer states and KL coefficient, metrics, export of the
    policy) and samples.jsonl.
    """
    result = run(cfg, lambda c, mesh, log: PPOJob(c, mesh, log, on_iteration),
                 perf.mfu_ceiling_flops_per_s(), log, progress_desc)
    if result.get("preempted"):
        return result
    job = result.pop("job")
    return {"last": job.last, "eval": result["eval"], "iterations": result["steps"],
            "export": result["export"], "wall_s": result["wall_s"]}


def _summary(result: dict) -> str:
    last, ev = result["last"], result["eval"]
    text = f"after {result['iterations']} iterations"
    if last:
        text += f": RM score {last['env/score']:.4f}, KL {last['env/kl']:.4f}"
    if ev:
        text += f"; held-out RM score {ev['score']:.4f}, KL {ev['kl']:.4f}"
    return text


def cli(argv: Sequence[str]) -> int:
    """`rlhf-jax ppo --config FILE key.sub=value ...`."""
    return command(argv, name="ppo", config_class=PPORunConfig, train=train, summary=_summary,
                   description="Fine-tune a policy with PPO against a reward model.",
                   example="ppo.kl_coef=0.1 iterations=20")
