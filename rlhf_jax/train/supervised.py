"""The supervised stages' job (SFT, reward model): a batch in, one optimizer step out.

A stage describes what differs (`SupervisedStage`: its head, data, step functions, metrics);
`SupervisedJob` builds the model, the sharded state and the jitted steps from it, and
`rlhf_jax.train.loop.run` drives it like every other stage.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import models
from rlhf_jax import sharding as shd
from rlhf_jax.config import check
from rlhf_jax.train import optim
from rlhf_jax.train.loop import RunConfig, prefixed
from rlhf_jax.train.model_source import (
    ArchConfig, ModelConfig, check_vocab, load_model, tokenizer_for,
)
from rlhf_jax.train.throughput import Work, training_flops


@dataclasses.dataclass(frozen=True)
class SupervisedConfig(RunConfig):
    """A supervised run (SFT, reward model): the fields of `RunConfig` and

    Attributes:
      model: (of RunConfig) and where the model starts: a Hugging Face directory
        (model.path) or a fresh one (model.init).
      grad_accum: microbatches per step (batch_size must divide by it).
      steps: optimizer steps; 0 = `epochs` passes over the training data.
      epochs: passes over the data when steps is 0.
    """

    model: ModelConfig = ModelConfig(init=ArchConfig())
    grad_accum: int = 1
    steps: int = 0
    epochs: int = 1

    def __post_init__(self):
        super().__post_init__()
        check(self.grad_accum > 0 and self.batch_size % self.grad_accum == 0, "grad_accum",
              self.grad_accum, f"a positive divisor of batch_size={self.batch_size}")
        check(self.steps >= 0, "steps", self.steps, "0 (use epochs) or more")
        check(self.epochs > 0, "epochs", self.epochs, "1 or more")


@dataclasses.dataclass(frozen=True)
class SupervisedStage:
    """What differs between the supervised stages.

    Attributes:
      head: the model head ("lm", "reward").
      load: (data config, tokenizer, batch size, seed) -> (training data, held-out data or
        None); the data serve `batch(i)`, `batches_per_epoch(e)`, `epoch_batches(e)` and
        `summary`.
      write_generated: (the data section's `synthetic` config, directory) -> {"train", "eval",
        "tokenizer"} paths of generated data (rlhf_jax.world).
      steps: (cfg, model, tx) -> (train_step(state, batch), eval_step(params, batch) -> sums),
        pure functions.
      batch_shardings: (cfg, mesh) -> the shardings of a batch's arrays.
      means: host sums of eval_step over the held-out set -> metric means.
      work: batch -> (padded length, rows computed, counts for perf/<name>_per_s).
      postfix: training metrics shown with the progress.
      finish: optional (job, params) -> (model, meta): a last change of the model before
        saving and export (reward normalisation), and what to store with the final checkpoint.
    """

    head: str
    load: Callable
    write_generated: Callable
    steps: Callable
    batch_shardings: Callable
    means: Callable[[dict], dict]
    work: Callable
    postfix: tuple = ("train/loss",)
    finish: Optional[Callable] = None


class GeneratedData:
    """Mixed into a stage's data section that declares `synthetic: Optional[<config>]`: data
    generated from the built-in world (`rlhf_jax.world`) stand in for `train`/`eval`."""

    GENERATED_HINT = " (or set data.synthetic)"

    def generated(self) -> bool:
        return self.synthetic is not None


def with_generated(data, out_dir: str, write: Callable):
    """(the data section with generated files as its train/eval sources, their tokenizer's
    directory), or (data, None) when it has no `synthetic` section."""
    if getattr(data, "synthetic", None) is None:
        return data, None
    paths = write(data.synthetic, os.path.join(out_dir, "synthetic"))
    data = dataclasses.replace(data, train=paths["train"], eval=paths["eval"] or data.eval)
    return data, paths["tokenizer"]


def compile_steps(stage: SupervisedStage, cfg: SupervisedConfig, model, tx, mesh,
                  state_shardings) -> tuple[Callable, Callable]:
    """(train_step(state, batch), eval_step(params, batch)) of `stage`, jitted with explicit
    shardings on `mesh`; the state is donated."""
    train_step, eval_step = stage.steps(cfg, model, tx)
    batch = stage.batch_shardings(cfg, mesh)
    replicated = shd.replicated(mesh)
    train = jax.jit(train_step, in_shardings=(state_shardings, batch),
                    out_shardings=(state_shardings, replicated), donate_argnums=0)
    evaluate = jax.jit(eval_step, in_shardings=(state_shardings.params, batch),
                       out_shardings=replicated)
    return train, evaluate


class SupervisedJob:
    """A supervised stage set up for a run: data, model, sharded state, jitted steps."""

    def __init__(self, cfg: SupervisedConfig, stage: SupervisedStage, mesh, log):
        self.cfg, self.stage, self.mesh, self.log = cfg, stage, mesh, log
        data, generated_tokenizer = with_generated(cfg.data, cfg.out_dir, stage.write_generated)
        self.tokenizer = tokenizer_for(cfg.model, cfg.model.path or generated_tokenizer)
        self.train_data, self.held_out = stage.load(data, self.tokenizer, cfg.batch_size,
                                                    cfg.seed)
        for part in (self.train_data, self.held_out):
            if part is not None:
                log(part.summary)
        self.total = cfg.steps or sum(self.train_data.batches_per_epoch(e)
                                      for e in range(cfg.epochs))
        self.model, params = load_model(cfg.model, cfg.model.source, self.tokenizer, mesh,
                                        cfg.seed, stage.head)
        check_vocab(self.tokenizer, self.model)
        tx = optim.make_optimizer(cfg.optim, self.total)
        self.lr = optim.learning_rate_schedule(cfg.optim, self.total)
        self.state, shardings = optim.sharded_state(models.abstract_params(self.model), params,
                                                    tx, mesh)
        del params
        self.train_fn, self.eval_fn = compile_steps(stage, cfg, self.model, tx, mesh, shardings)
        self.unit, self.postfix = "step", stage.postfix
        self.meta: dict = {}
        self._batch = None

    def step(self, state, k: int):
        self._batch = self.train_data.batch(k - 1)
        return self.train_fn(state, shd.shard_batch(self._batch, self.mesh))

    def work(self, k: int):
        length, rows, counts = self.stage.work(self._batch)
        logit_columns = length if self.stage.head == "lm" else 0
        return Work(length, training_flops(self.model.cfg, rows, length, logit_columns),
                    counts, slots=rows * length)

    def log_row(self, k: int, metrics: dict) -> dict:
        return {**prefixed(jax.device_get(metrics), "train"), "train/lr": float(self.lr(k - 1))}

    def evaluate(self, state) -> dict:
        if self.held_out is None:
            return {}
        total: dict = {}
        for batch in self.held_out.epoch_batches(0):
            sums = self.eval_fn(state.params, shd.shard_batch(batch, self.mesh))
            total = sums if not total else jax.tree_util.tree_map(jnp.add, total, sums)
        return self.stage.means({k: float(v) for k, v in jax.device_get(total).items()})

    def finish(self, state) -> dict:
        if self.stage.finish is None:
            return {}
        self.model, self.meta = self.stage.finish(self, state.params)
        return self.meta

    def export(self, state, directory: str) -> None:
        models.save_hf(directory, self.model, state.params, self.tokenizer)
