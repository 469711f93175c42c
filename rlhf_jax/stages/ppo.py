"""`rlhf-jax ppo`: the PPO loop that drives the engine of `rlhf_jax.rl.engine`.

Each iteration, on the device mesh:

    prompts  → generate (policy, KV cache, one while_loop)              generate.py
             → score: policy / reference log-probs, values, RM scores   ppo.score
             → KL-shaped rewards → GAE → whitened advantages            ppo.with_advantages
             → ppo_epochs × minibatches of clipped updates               ppo.train_step
             → KL controller update (fixed or adaptive)

`PPOEngine` holds the three jit-compiled programs for given modules and can be driven by
other code (the demo, tests with a rule-based reward); `train` is the configured loop with
checkpoints, logging and export. RNG: iteration k uses `fold_in(key(seed), k)`, and prompt
batch k is a pure function of (seed, k), so a resumed run continues exactly.

    rlhf-jax ppo --config configs/ppo_tiny.yaml iterations=50 out_dir=runs/ppo
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import config as config_lib
from rlhf_jax import models
from rlhf_jax import sharding as shd
from rlhf_jax.config import ConfigError, check
from rlhf_jax.data.prompts import PromptDataConfig, Prompts, load_prompts
from rlhf_jax.models.sampling import SamplingConfig, pad_prompts
from rlhf_jax.rl import ppo
from rlhf_jax.rl.engine import PPOEngine
from rlhf_jax.train import optim
from rlhf_jax.train.checkpoint import CheckpointConfig
from rlhf_jax.train.optim import OptimizerConfig
from rlhf_jax.train.runner import GuardConfig, Runner, run_command

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class PPORunConfig:
    """A PPO run.

    Attributes:
      out_dir: where checkpoints, metrics, samples, the resolved config and the export go.
      seed: seed of sampling, minibatch order, prompt order and a fresh value head.
      policy: Hugging Face causal-LM directory (the SFT model); also the reference model.
      reward_model: Hugging Face sequence-classification directory (ours or transformers').
      critic: directory the separate critic starts from (none = `reward_model`, as the
        reference implementations do); unused with `ppo.value_kind: shared`.
      tokenizer: tokenizer directory (none = `policy`).
      dtype: compute dtype, float32 or bfloat16 (params stay float32).
      remat: recompute each block in the backward pass (saves activation memory).
      scan_layers: run the blocks in one `lax.scan` (one block compiled, fastest to compile
        for deep models); false unrolls them: on CPU ~10% faster training steps (small
        benchmark model), longer compile. Keep it fixed across a run and its resumes.
      prompts: the prompt dataset.
      sampling: how responses are sampled (its temperature must equal ppo.temperature).
      ppo: PPO hyper-parameters (rlhf_jax.rl.ppo.PPOConfig).
      optim: optimizer and learning-rate schedule of policy and critic.
      mesh: device mesh (data, fsdp, tensor); -1 fills with the remaining devices.
      batch_size: prompts per iteration (global).
      iterations: PPO iterations (rollout + update).
      log_every: write metrics every this many iterations.
      sample_every: log a table of prompts, responses and scores every this many
        iterations (0 = never); rows go to out_dir/samples.jsonl.
      num_logged_samples: rows of that table.
      eval_every: mean RM score and KL on held-out prompts every this many iterations
        (0 = only at the end; needs prompts.eval or prompts.eval_fraction).
      export: write the trained policy (+ tokenizer) in Hugging Face format to out_dir/export.
      checkpoint: checkpoint schedule and resume.
      guard: what to do on a non-finite loss or gradient.
    """

    out_dir: str = "runs/ppo"
    seed: int = 0
    policy: str = ""
    reward_model: str = ""
    critic: Optional[str] = None
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = True
    prompts: PromptDataConfig = PromptDataConfig(train="prompts.jsonl")
    sampling: SamplingConfig = SamplingConfig(max_new_tokens=32)
    ppo: ppo.PPOConfig = ppo.PPOConfig()
    optim: OptimizerConfig = OptimizerConfig(learning_rate=1e-5)
    mesh: tuple[int, int, int] = (1, -1, 1)
    batch_size: int = 16
    iterations: int = 100
    log_every: int = 1
    sample_every: int = 10
    num_logged_samples: int = 4
    eval_every: int = 0
    export: bool = True
    checkpoint: CheckpointConfig = CheckpointConfig()
    guard: GuardConfig = GuardConfig()

    def __post_init__(self):
        check(bool(self.policy), "policy", self.policy,
              "a Hugging Face causal-LM directory (config.json + *.safetensors)")
        check(bool(self.reward_model), "reward_model", self.reward_model,
              "a Hugging Face sequence-classification directory")
        check(self.dtype in ("float32", "bfloat16"), "dtype", self.dtype, "float32 or bfloat16")
        check(self.sampling.temperature == self.ppo.temperature, "sampling.temperature",
              self.sampling.temperature,
              f"the same value as ppo.temperature={self.ppo.temperature} (the update must score "
              "responses with the distribution that sampled them)")
        per_update = self.ppo.num_minibatches * self.ppo.grad_accum
        check(self.batch_size > 0 and self.batch_size % per_update == 0, "batch_size",
              self.batch_size, f"a positive multiple of ppo.num_minibatches × ppo.grad_accum "
              f"= {per_update}")
        check(self.iterations >= 1, "iterations", self.iterations, "1 or more")
        check(self.log_every >= 1, "log_every", self.log_every, "1 or more")
        check(self.sample_every >= 0, "sample_every", self.sample_every, "0 (never) or more")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "0 (end only) or more")


CONFIG_CLASS = PPORunConfig


# ----------------------------------------------------------------------------- setup


def load_models(cfg: PPORunConfig, mesh):
    """(policy, critic or None, reward model, params {"policy", "critic"?}, frozen {"ref",
    "reward"}), every param placed on `mesh`. The reference is a copy of the starting policy."""
    overrides = {"dtype": cfg.dtype, "remat": cfg.remat, "scan_layers": cfg.scan_layers}
    shared = cfg.ppo.value_kind == ppo.ValueKind.SHARED
    policy, policy_params = models.load_hf(cfg.policy, head="lm+value" if shared else "lm",
                                           mesh=mesh, seed=cfg.seed, **overrides)
    reward_model, reward_params = models.load_hf(cfg.reward_model, head="reward", mesh=mesh,
                                                 **overrides)
    params = {"policy": policy_params}
    critic = None
    if not shared:
        critic, params["critic"] = models.load_hf(cfg.critic or cfg.reward_model, head="reward",
                                                  mesh=mesh, **overrides)
    ref = jax.tree_util.tree_map(jnp.copy, policy_params)
    return policy, critic, reward_model, params, {"ref": ref, "reward": reward_params}


def _check_vocab(tokenizer, *modules) -> None:
    for m in modules:
        if m is not None and len(tokenizer) > m.cfg.vocab_size:
            raise ConfigError("tokenizer", f"the tokenizer has {len(tokenizer)} tokens but a "
                              f"model's vocabulary only {m.cfg.vocab_size}; use the models' "
                              "tokenizer")


def _sample_rows(tokenizer, prompts: Prompts, rows, rollout, scores, n: int) -> list[dict]:
    host = jax.device_get((rollout.tokens, rollout.lengths, scores))
    out = []
    for i in range(min(n, len(rows))):
        length = int(host[1][i])
        out.append({"prompt": prompts.texts[int(rows[i])],
                    "response": tokenizer.decode(host[0][i, :length], skip_special_tokens=True),
                    "score": float(host[2][i])})
    return out


def _postfix(metrics: dict) -> dict:
    return {"score": f"{metrics['env/score']:.3f}", "kl": f"{metrics['env/kl']:.3f}"}


def train(cfg: PPORunConfig, log: Callable[[str], None] = print, progress_desc: str = "ppo",
          on_iteration: Optional[Callable[[int, list[str], list[str]], dict]] = None) -> dict:
    """Runs (or resumes) PPO as `cfg` says; returns the last metrics and held-out evaluation.

    `on_iteration(iteration, prompts, responses)` (texts of the batch) may return extra
    metrics to log with the iteration's, e.g. a score by a judge the RM only approximates.

    Writes to cfg.out_dir: config.yaml, checkpoints/ (policy, critic, optimizer states, KL
    coefficient, iteration), metrics.jsonl and TensorBoard events, samples.jsonl, export/.
    """
    from tqdm import tqdm

    from rlhf_jax.train.logging import MetricsLogger, format_table

    wall = time.perf_counter()
    mesh = shd.make_mesh(cfg.mesh)
    tokenizer = models.load_tokenizer(cfg.tokenizer or cfg.policy)
    train_prompts, held_out = load_prompts(cfg.prompts, tokenizer, cfg.seed)
    for part in (train_prompts, held_out):
        if part is not None:
            log(part.summary)
    policy, critic, reward_model, params, frozen = load_models(cfg, mesh)
    _check_vocab(tokenizer, policy, critic, reward_model)
    room = policy.cfg.max_position_embeddings - cfg.sampling.max_new_tokens
    if cfg.prompts.max_prompt_length > room:
        raise ConfigError("prompts.max_prompt_length", "config keys prompts.max_prompt_length="
                          f"{cfg.prompts.max_prompt_length} + sampling.max_new_tokens="
                          f"{cfg.sampling.max_new_tokens} exceed the policy's "
                          f"{policy.cfg.max_position_embeddings} positions; lower one of them")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    tx = optim.make_optimizer(cfg.optim, cfg.iterations * cfg.ppo.ppo_epochs
                              * cfg.ppo.num_minibatches)
    engine = PPOEngine(policy, critic, reward_model, cfg.ppo, cfg.sampling, tx,
                       tokenizer.eos_token_id, int(pad or 0), cfg.seed)
    result: dict = {}
    samples_path = os.path.join(cfg.out_dir, "samples.jsonl")
    with Runner(cfg.out_dir, cfg.checkpoint, cfg.guard, config=cfg, log=log) as run, \
            shd.use_mesh(mesh):
        state = engine.init_state(params, tx)
        del params
        start, state, _ = run.resume(state)
        logger = MetricsLogger(cfg.out_dir, resume_step=start or None,
                               enabled=jax.process_index() == 0)
        if not start and os.path.exists(samples_path):
            os.remove(samples_path)
        with run.preemptible(), tqdm(total=cfg.iterations, initial=start, desc=progress_desc,
                                     unit="it") as bar:
            for it in range(start + 1, cfg.iterations + 1):
                rows = train_prompts.batch_rows(it - 1, cfg.batch_size)
                ids, mask = pad_prompts([train_prompts.ids[r] for r in rows],
                                        cfg.sampling.prompt_bucket, int(pad or 0))
                ids, mask = shd.shard_batch((ids, mask), mesh)
                state, metrics, rollout, scores = engine.iteration(state, frozen, ids, mask, it)
                if not run.after_step(it, state, {"loss": metrics["ppo/loss"],
                                                  "grad_norm": metrics["ppo/grad_norm"],
                                                  "update_norm": metrics["ppo/update_norm"]},
                                      {"data_position": it}):
                    return {"preempted": True, "exit_code": run.exit_code()}
                if on_iteration is not None:
                    texts = _sample_rows(tokenizer, train_prompts, rows, rollout, scores,
                                         len(rows))
                    metrics.update(on_iteration(it, [t["prompt"] for t in texts],
                                                [t["response"] for t in texts]))
                bar.update(1)
                bar.set_postfix(_postfix(metrics))
                if it % cfg.log_every == 0 or it == cfg.iterations:
                    logger.log(it, metrics)
                result = metrics
                if cfg.sample_every and it % cfg.sample_every == 0 and jax.process_index() == 0:
                    table = _sample_rows(tokenizer, train_prompts, rows, rollout, scores,
                                         cfg.num_logged_samples)
                    with open(samples_path, "a", encoding="utf-8") as f:
                        for row in table:
                            f.write(json.dumps({"iteration": it, **row}) + "\n")
                    log(f"iteration {it} samples:\n" + format_table(table))
                if held_out is not None and cfg.eval_every and it % cfg.eval_every == 0 \
                        and it < cfg.iterations:
                    ev = engine.evaluate(state.train.params["policy"], frozen, held_out,
                                         cfg.batch_size, mesh)
                    logger.log(it, {f"eval/{k}": v for k, v in ev.items()})
        evaluation = {}
        if held_out is not None:
            evaluation = engine.evaluate(state.train.params["policy"], frozen, held_out,
                                         cfg.batch_size, mesh)
            logger.log(cfg.iterations, {f"eval/{k}": v for k, v in evaluation.items()})
        run.finish(cfg.iterations, state, {"data_position": cfg.iterations})
        logger.close()
        policy_params = jax.device_get(state.train.params["policy"])
    export = os.path.join(cfg.out_dir, "export")
    if cfg.export and jax.process_index() == 0:
        models.save_hf(export, policy, policy_params, tokenizer)
        log(f"exported the policy to {export}")
    return {"last": result, "eval": evaluation, "iterations": cfg.iterations,
            "export": export if cfg.export else None, "wall_s": time.perf_counter() - wall}


def cli(argv: list[str]) -> int:
    """`rlhf-jax ppo --config FILE key.sub=value ...`."""
    parser = argparse.ArgumentParser(
        prog="rlhf-jax ppo", description="Fine-tune a policy with PPO against a reward model.")
    parser.add_argument("--config", help="YAML file of PPORunConfig fields (configs/ppo_tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="override config keys, e.g. ppo.kl_coef=0.1 iterations=20")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    def body() -> int:
        cfg = config_lib.load(PPORunConfig, args.config, args.overrides)
        shd.check_mesh(cfg.mesh)
        result = train(cfg, log=tqdm.write)
        if result.get("preempted"):
            return result["exit_code"]
        last, ev = result["last"], result["eval"]
        print(f"after {result['iterations']} iterations: RM score {last['env/score']:.4f}, "
              f"KL {last['env/kl']:.4f}"
              + (f"; held-out RM score {ev['score']:.4f}, KL {ev['kl']:.4f}" if ev else ""))
        return 0

    return run_command("rlhf-jax ppo", body)
