"""Pieces every trainer loop shares: where the model comes from, the sharded train state, and
throughput / MFU accounting.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax

from rlhf_jax import models, perf
from rlhf_jax.train import optim
from rlhf_jax import sharding as shd
from rlhf_jax.train.checkpoint import CheckpointConfig
from rlhf_jax.config import ConfigError, check
from rlhf_jax.models.config import Family, TransformerConfig
from rlhf_jax.train.runner import GuardConfig


@dataclasses.dataclass(frozen=True)
class ArchConfig:
    """A fresh transformer for from-scratch runs; vocabulary and special ids come from the
    tokenizer.

    Attributes:
      family: gpt2, llama or qwen2 (names and layout of the export).
      hidden_size: model width.
      num_layers: decoder blocks.
      num_heads: attention heads.
      num_kv_heads: key/value heads (none = num_heads).
      intermediate_size: MLP width.
      max_position_embeddings: longest sequence the model accepts.
    """

    family: Family = Family.GPT2
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: Optional[int] = None
    intermediate_size: int = 128
    max_position_embeddings: int = 512


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where the reward model starts.

    Attributes:
      path: a Hugging Face model directory: a causal LM, or a sequence-classification
        model with one label (ours or transformers'); a head the stage needs and the
        checkpoint lacks (an RM's score head) is added.
      init: or a fresh architecture, trained from scratch.
      tokenizer: tokenizer directory; none = `path` (or the synthetic data's tokenizer).
      dtype: compute dtype, float32 or bfloat16 (params stay float32).
      remat: recompute each block in the backward pass (saves activation memory).
      scan_layers: run the blocks in one `lax.scan` (one block compiled, fastest to compile
        for deep models); false unrolls them: on CPU ~10% faster training steps (small
        benchmark model), longer compile. Keep it fixed across a run and its resumes.
    """

    path: Optional[str] = None
    init: Optional[ArchConfig] = None
    tokenizer: Optional[str] = None
    dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = True

    def __post_init__(self):
        check((self.path is None) != (self.init is None), "path", self.path,
              "exactly one of model.path (a Hugging Face directory) and model.init (a fresh "
              "architecture)")
        check(self.dtype in ("float32", "bfloat16"), "dtype", self.dtype, "float32 or bfloat16")


def load_tokenizer(cfg: ModelConfig, fallback: Optional[str] = None):
    """The tokenizer at `cfg.tokenizer`, else `cfg.path`, else `fallback` (generated data's)."""
    path = cfg.tokenizer or cfg.path or fallback
    if path is None:
        raise ConfigError("model.tokenizer", "config key 'model.tokenizer' is required when the "
                                             "model is trained from scratch on files")
    return models.load_tokenizer(path)


def load_model(cfg: ModelConfig, tokenizer, mesh, seed: int, head: str):
    """(model with `head`, params placed on `mesh`) from a Hugging Face directory (a new head
    is added where the checkpoint has none) or a fresh init."""
    overrides = {"dtype": cfg.dtype, "remat": cfg.remat, "scan_layers": cfg.scan_layers}
    if cfg.path is not None:
        return models.load_hf(cfg.path, head=head, mesh=mesh, seed=seed, **overrides)
    arch = cfg.init
    vocab = -(-len(tokenizer) // 64) * 64  # rounded up: divisible by tensor-parallel sizes
    family = Family(arch.family)
    tcfg = TransformerConfig(
        family=family,
        vocab_size=vocab,
        hidden_size=arch.hidden_size,
        num_layers=arch.num_layers,
        num_heads=arch.num_heads,
        num_kv_heads=arch.num_kv_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_position_embeddings,
        qkv_bias=family != Family.LLAMA,
        tie_word_embeddings=family != Family.LLAMA,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **overrides,
    )
    return models.init_model(tcfg, head, seed=seed, mesh=mesh)


def create_state(model, params, tx, mesh, rules=shd.DEFAULT_RULES):
    """(train state, its shardings): optimizer moments sharded like the params they follow."""
    abstract = jax.eval_shape(lambda p: optim.create_state(p, tx), models.abstract_params(model))
    shardings = shd.shardings_for(abstract, mesh, rules)
    with shd.use_mesh(mesh, rules):
        state = jax.jit(lambda p: optim.create_state(p, tx), out_shardings=shardings)(params)
    return state, shardings


def jit_steps(train_step, eval_step, state_shardings, batch_shardings, mesh):
    """(train, evaluate) jitted with explicit shardings; the train state is donated.

    `train_step(state, batch) -> (state, metrics)`, `eval_step(params, batch) -> sums`.
    """
    replicated = shd.replicated(mesh)
    train = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                    out_shardings=(state_shardings, replicated), donate_argnums=0)
    evaluate = jax.jit(eval_step, in_shardings=(state_shardings.params, batch_shardings),
                       out_shardings=replicated)
    return train, evaluate


def matmul_ceiling() -> float:
    """The machine's measured float32 matmul rate (bfloat16 on accelerators): the MFU ceiling."""
    import jax.numpy as jnp

    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return perf.matmul_flops_per_s(1024, 1024, 1024, dtype)


class Throughput:
    """Counts per second and MFU over a logging window; steps that compiled are left out.

    `add(seq_len, seconds, sequences, counts)`: a step over `sequences` rows of `seq_len`
    slots (padding included: what the device computes), with counts such as
    {"tokens": real tokens, "pairs": ...} reported as perf/<name>_per_s. With "tokens",
    perf/fill is the share of slots that hold real tokens.
    """

    def __init__(self, model_cfg: TransformerConfig, ceiling_flops_per_s: float,
                 lm_head: bool = True):
        self.cfg, self.ceiling, self.lm_head = model_cfg, ceiling_flops_per_s, lm_head
        self.shapes: set = set()
        self.reset()

    def reset(self) -> None:
        self.seconds = self.slots = self.flops = 0.0
        self.counts: dict[str, float] = {}

    def add(self, seq_len: int, seconds: float, sequences: int, counts: dict) -> None:
        if seq_len not in self.shapes:  # the first step at this length compiled: not a sample
            self.shapes.add(seq_len)
            return
        per_token = models.flops_per_token(self.cfg, seq_len, training=True)
        if not self.lm_head:  # a scalar head instead of the vocabulary projection
            per_token -= 6 * self.cfg.vocab_size * self.cfg.hidden_size
        self.seconds += seconds
        self.slots += sequences * seq_len
        self.flops += per_token * sequences * seq_len
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0.0) + float(v)

    def metrics(self) -> dict[str, float]:
        if not self.seconds:
            return {}
        out = {f"perf/{k}_per_s": v / self.seconds for k, v in self.counts.items()}
        if "tokens" in self.counts:
            out["perf/fill"] = self.counts["tokens"] / self.slots
        out["perf/mfu"] = self.flops / self.seconds / self.ceiling
        self.reset()
        return out


def sum_over_epoch(eval_fn: Callable, params, data, mesh) -> dict:
    """Host sums of `eval_fn(params, batch)` (a dict of sums) over every batch of one epoch."""
    import jax.numpy as jnp

    total: dict = {}
    for batch in data.epoch_batches(0):
        sums = eval_fn(params, shd.shard_batch(batch, mesh))
        total = sums if not total else jax.tree_util.tree_map(jnp.add, total, sums)
    return {k: float(v) for k, v in jax.device_get(total).items()}


def prefixed(metrics: dict, prefix: str) -> dict[str, float]:
    """{"prefix/key": float} of a metrics dict."""
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every supervised training run (SFT, reward model) is configured with.

    Attributes:
      out_dir: where checkpoints, metrics, the resolved config and the export go.
      seed: seed of the initialisation, held-out split and data order.
      model: the starting model: a Hugging Face directory (model.path) or a fresh one
        (model.init).
      optim: optimizer and learning-rate schedule.
      mesh: device mesh (data, fsdp, tensor); -1 fills with the remaining devices.
      batch_size: rows (SFT) or preference pairs (RM) per optimizer step, global over hosts.
      grad_accum: microbatches per step (batch_size must divide by it).
      steps: optimizer steps; 0 = `epochs` passes over the training data.
      epochs: passes over the data when steps is 0.
      eval_every: evaluate on the held-out split every this many steps (0 = only at the end).
      log_every: write training metrics every this many steps.
      export: write the trained model (+ tokenizer) in Hugging Face format to out_dir/export.
      checkpoint: checkpoint schedule and resume.
      guard: what to do on a non-finite loss or gradient.
    """

    out_dir: str = "runs/train"
    seed: int = 0
    model: ModelConfig = ModelConfig(init=ArchConfig())
    optim: optim.OptimizerConfig = optim.OptimizerConfig()
    mesh: tuple[int, int, int] = (1, -1, 1)
    batch_size: int = 32
    grad_accum: int = 1
    steps: int = 0
    epochs: int = 1
    eval_every: int = 0
    log_every: int = 10
    export: bool = True
    checkpoint: CheckpointConfig = CheckpointConfig()
    guard: GuardConfig = GuardConfig()

    def __post_init__(self):
        check(self.batch_size > 0, "batch_size", self.batch_size, "1 or more")
        check(self.grad_accum > 0 and self.batch_size % self.grad_accum == 0, "grad_accum",
              self.grad_accum, f"a positive divisor of batch_size={self.batch_size}")
        check(self.steps >= 0, "steps", self.steps, "0 (use epochs) or more")
        check(self.epochs > 0, "epochs", self.epochs, "1 or more")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "0 (end only) or more")
        check(self.log_every > 0, "log_every", self.log_every, "1 or more")


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class Stage:
    """What differs between the supervised trainers (SFT, reward model); `fit` runs the rest.

    Attributes:
      head: the model head ("lm", "reward").
      load_data: cfg -> (tokenizer, training data, held-out data or None); the data serve
        `batch(i)`, `batches_per_epoch(e)`, `epoch_batches(e)` and `summary`.
      compile_steps: (cfg, model, tx, mesh, state shardings) -> (train_fn, eval_fn).
      evaluate: (eval_fn, params, data, mesh) -> held-out metric means.
      work: batch -> (padded length, sequences computed, counts for perf/<name>_per_s).
      lm_head: the model computes vocabulary logits (for the MFU count).
      postfix: training metrics shown on the progress bar.
      finish: optional (cfg, model, params, train data, held-out, mesh, log) -> (model, meta):
        a last change of the model before saving and export (reward normalisation), and
        what to store with the final checkpoint.
    """

    head: str
    load_data: Callable
    compile_steps: Callable
    evaluate: Callable
    work: Callable
    lm_head: bool = True
    postfix: tuple = ("loss",)
    finish: Optional[Callable] = None


def fit(cfg, stage: Stage, log: Callable[[str], None] = print, progress_desc: str = "train") -> dict:
    """Trains (or resumes) a stage as `cfg` says; returns the final held-out metrics.

    Writes to cfg.out_dir: config.yaml, checkpoints/ (state and data position, resumed from
    when present), metrics.jsonl and TensorBoard events, and export/ (Hugging Face).
    """
    import os
    import time

    from tqdm import tqdm

    from rlhf_jax.train.logging import MetricsLogger
    from rlhf_jax.train.runner import Runner

    wall = time.perf_counter()
    tokenizer, train_data, held_out = stage.load_data(cfg)
    mesh = shd.make_mesh(cfg.mesh)
    for part in (train_data, held_out):
        if part is not None:
            log(part.summary)
    total = cfg.steps or sum(train_data.batches_per_epoch(e) for e in range(cfg.epochs))
    model, params = load_model(cfg.model, tokenizer, mesh, cfg.seed, stage.head)
    if len(tokenizer) > model.cfg.vocab_size:
        raise ConfigError("model.tokenizer",
                          f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary "
                          f"only {model.cfg.vocab_size}; use the model's tokenizer")
    tx = optim.make_optimizer(cfg.optim, total)
    lr = optim.learning_rate_schedule(cfg.optim, total)
    state, shardings = create_state(model, params, tx, mesh)
    del params
    train_fn, eval_fn = stage.compile_steps(cfg, model, tx, mesh, shardings)
    perf_window = Throughput(model.cfg, matmul_ceiling(), lm_head=stage.lm_head)
    result: dict = {}
    meta: dict = {}
    with Runner(cfg.out_dir, cfg.checkpoint, cfg.guard, config=cfg, log=log) as run, \
            shd.use_mesh(mesh):
        start, state, _ = run.resume(state)
        logger = MetricsLogger(cfg.out_dir, resume_step=start or None,
                               enabled=jax.process_index() == 0)
        with run.preemptible(), tqdm(total=total, initial=start, desc=progress_desc,
                                     unit="step") as bar:
            for step in range(start + 1, total + 1):
                tick = time.perf_counter()
                batch = train_data.batch(step - 1)
                state, metrics = train_fn(state, shd.shard_batch(batch, mesh))
                if not run.after_step(step, state, metrics, {"data_position": step}):
                    logger.close()
                    return {"preempted": True, "exit_code": run.exit_code()}
                # after_step read the loss back, so the step is done: its time is complete
                length, sequences, counts = stage.work(batch)
                perf_window.add(length, time.perf_counter() - tick, sequences, counts)
                bar.update(1)
                if step % cfg.log_every == 0 or step == total:
                    host = jax.device_get(metrics)
                    bar.set_postfix({k: f"{float(host[k]):.3f}" for k in stage.postfix})
                    logger.log(step, {**prefixed(host, "train"), "train/lr": float(lr(step - 1)),
                                      **perf_window.metrics()})
                if held_out is not None and cfg.eval_every and step % cfg.eval_every == 0 \
                        and step < total:  # the last step is evaluated below
                    logger.log(step, prefixed(stage.evaluate(eval_fn, state.params, held_out,
                                                             mesh), "eval"))
        if held_out is not None:
            result = stage.evaluate(eval_fn, state.params, held_out, mesh)
            logger.log(total, prefixed(result, "eval"))
        if stage.finish is not None:
            model, meta = stage.finish(cfg, model, state.params, train_data, held_out, mesh, log)
        run.finish(total, state, {"data_position": total, **meta})
        logger.close()
    export = os.path.join(cfg.out_dir, "export")
    if cfg.export and jax.process_index() == 0:
        models.save_hf(export, model, jax.device_get(state.params), tokenizer)
        log(f"exported the model to {export}")
    return {"eval": result, "steps": total, "model": model,
            "export": export if cfg.export else None, "wall_s": time.perf_counter() - wall}
