"""The run frame every stage plugs into: configure, resume, step, log, evaluate, save, export.

    rlhf-jax <stage> --config FILE key.sub=value ...   →   command(...)  →   run(cfg, setup)

A stage supplies a `Job` (its state, one step, its evaluation and export) through a
`setup(cfg, mesh, log)` function; `run` does everything else the same way for every stage:

    check a resumed run's config against the saved one          (train/runner.py)
    job = setup(cfg, mesh, log)                                  the stage: data, models, state
    resume the newest readable checkpoint
    for k in start + 1 … job.total:
        state, metrics = job.step(state, k)                      the stage's work
        guard (non-finite → stop or skip), save on schedule or on SIGTERM
        every log_every: metrics row + perf/* (MFU from job.work) → metrics.jsonl, TensorBoard
        every eval_every: job.evaluate → eval/* rows
    final evaluation, final checkpoint, export (process 0)

Steps are counted from 1; a checkpoint at step k holds the state after k steps, and step k's
inputs are a pure function of (seed, k), so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from typing import Any, Callable, Protocol, Sequence

import jax

from rlhf_jax import config as config_lib
from rlhf_jax import models
from rlhf_jax import sharding as shd
from rlhf_jax.config import check
from rlhf_jax.train import progress
from rlhf_jax.train.checkpoint import CheckpointConfig
from rlhf_jax.train.logging import MetricsLogger
from rlhf_jax.train.model_source import ModelOptions
from rlhf_jax.train.optim import OptimizerConfig
from rlhf_jax.train.runner import GuardConfig, Runner, fail, run_command
from rlhf_jax.train.throughput import Throughput, Work

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every training run is configured with (each stage adds its own fields).

    Attributes:
      out_dir: where checkpoints, metrics, the resolved config and the export go.
      seed: seed of the initialisation, held-out split, data order and sampling.
      model: how the run's models are read and computed (each stage says where they start).
      optim: optimizer and learning-rate schedule.
      mesh: device mesh (data, fsdp, tensor); -1 fills with the remaining devices.
      batch_size: global over hosts: rows (SFT) or preference pairs (RM) per optimizer
        step, prompts per iteration (PPO).
      log_every: write training metrics every this many steps.
      eval_every: evaluate on the held-out split every this many steps (0 = only at the end).
      export: write the trained model (+ tokenizer) in Hugging Face format to out_dir/export.
      checkpoint: checkpoint schedule and resume.
      guard: what to do on a non-finite loss or gradient.
    """

    out_dir: str = "runs/train"
    seed: int = 0
    model: ModelOptions = ModelOptions()
    optim: OptimizerConfig = OptimizerConfig()
    mesh: tuple[int, int, int] = (1, -1, 1)
    batch_size: int = 32
    log_every: int = 10
    eval_every: int = 0
    export: bool = True
    checkpoint: CheckpointConfig = CheckpointConfig()
    guard: GuardConfig = GuardConfig()

    # Keys a resumed run may change: how long it runs, what it logs and saves. Any other
    # change would make the run's record describe something it did not do.
    RESUMABLE_KEYS = ("out_dir", "steps", "epochs", "iterations", "log_every", "eval_every",
                      "sample_every", "num_logged_samples", "export", "checkpoint", "guard",
                      "mesh")

    def __post_init__(self):
        check(self.batch_size > 0, "batch_size", self.batch_size, "1 or more")
        check(self.log_every > 0, "log_every", self.log_every, "1 or more")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "0 (end only) or more")


class Job(Protocol):
    """What a stage supplies to `run`.

    Attributes:
      state: the starting train state (a pytree placed on the mesh; checkpointed whole).
      total: how many steps the run has.
      unit: what a step is called in the progress ("step", "iteration").
      postfix: names of `log_row` entries shown with the progress.
    """

    state: Any
    total: int
    unit: str
    postfix: tuple[str, ...]

    def step(self, state: Any, k: int) -> tuple[Any, dict]:
        """Step k (from 1): (new state, metrics). Metrics named `loss`, `grad_norm` or
        `update_norm` (under any prefix) are guarded; values may stay on device."""

    def work(self, k: int) -> Work:
        """What step k computed (shape, model FLOPs, counts) for perf/*: throughput, MFU."""

    def log_row(self, k: int, metrics: dict) -> dict[str, float]:
        """The metrics.jsonl row of step k (host floats, hierarchical names)."""

    def evaluate(self, state: Any) -> dict[str, float]:
        """Held-out metrics (unprefixed), {} when there is nothing held out."""

    def finish(self, state: Any) -> dict:
        """Last work before the final save (e.g. reward normalisation); what to store with
        the final checkpoint."""

    def export(self, state: Any, directory: str) -> None:
        """Writes the trained model in Hugging Face format (`models.save_hf`: called on every
        process, process 0 writes)."""


def prefixed(metrics: dict, prefix: str) -> dict[str, float]:
    """{"prefix/key": float} of a metrics dict."""
    return {f"{prefix}/{k}": float(v) for k, v in metrics.items()}


def run(cfg: RunConfig, setup: Callable[[Any, Any, Log], Job], ceiling_flops_per_s: float,
        log: Log = print, desc: str = "train") -> dict:
    """Trains (or resumes) a stage as `cfg` says; returns {"eval", "steps", "job", "export",
    "wall_s"} (or {"preempted": True, "exit_code"} when stopped by a signal).

    Writes to cfg.out_dir: config.yaml (and config_history.yaml), checkpoints/,
    metrics.jsonl and TensorBoard events, export/ (Hugging Face format).
    """
    wall = time.perf_counter()
    slow = models.dtype_warning(cfg.model.dtype, jax.default_backend())
    if slow:
        log(f"warning: {slow}")
    mesh = shd.make_mesh(cfg.mesh)
    with Runner(cfg.out_dir, cfg.checkpoint, cfg.guard, config=cfg, log=log) as runner, \
            shd.use_mesh(mesh):
        job = setup(cfg, mesh, log)
        start, state, _ = runner.resume(job.state)
        job.state = None  # the loop's state is the only live copy (donated step by step)
        logger = MetricsLogger(cfg.out_dir, resume_step=start or None,
                               enabled=jax.process_index() == 0)
        with logger:
            state = _loop(cfg, job, runner, logger, state, start, ceiling_flops_per_s, desc)
            if runner.preempted:
                return {"preempted": True, "exit_code": runner.exit_code()}
            result = job.evaluate(state)
            if result and start < job.total:  # a finished run resumed again: logged already
                logger.log(job.total, prefixed(result, "eval"))
            meta = job.finish(state)
            runner.finish(job.total, state, {"data_position": job.total, **meta})
    export = os.path.join(cfg.out_dir, "export")
    if cfg.export:  # every process: tensors split over hosts are gathered one at a time
        job.export(state, export)
        if jax.process_index() == 0:
            log(f"exported the model to {export}")
    return {"eval": result, "steps": job.total, "job": job,
            "export": export if cfg.export else None, "wall_s": time.perf_counter() - wall}


def _loop(cfg, job: Job, runner: Runner, logger: MetricsLogger, state, start: int,
          ceiling: float, desc: str):
    """Steps start + 1 … job.total; returns the last state (early when preempted)."""
    window = Throughput(ceiling)
    with runner.preemptible(), progress.progress(job.total, initial=start, desc=desc,
                                                     unit=job.unit) as bar:
        for k in range(start + 1, job.total + 1):
            tick = time.perf_counter()
            state, metrics = job.step(state, k)
            if not runner.after_step(k, state, metrics, {"data_position": k}):
                return state
            # after_step read the guarded metrics back, so the step is done: its time is whole
            window.add(job.work(k), time.perf_counter() - tick)
            bar.update(1)
            if k % cfg.log_every == 0 or k == job.total:
                row = {**job.log_row(k, metrics), **window.metrics()}
                bar.set_postfix({name.rsplit("/", 1)[-1]: row[name] for name in job.postfix
                                 if name in row})
                logger.log(k, row)
            if cfg.eval_every and k % cfg.eval_every == 0 and k < job.total:
                held_out = job.evaluate(state)  # the last step is evaluated by `run`
                if held_out:
                    logger.log(k, prefixed(held_out, "eval"))
    return state


# ----------------------------------------------------------------------------- command line


def command(argv: Sequence[str], *, name: str, description: str, config_class,
            train: Callable[..., dict], summary: Callable[[dict], str], example: str) -> int:
    """`rlhf-jax <name> --config FILE key.sub=value ...` for a stage: parse, load the config,
    `train(cfg, log=...)`, print `summary(result)`; bad input ends in one line and an exit code
    (see `runner.run_command`)."""
    prog = f"rlhf-jax {name}"
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=f"YAML file of {config_class.__name__} fields")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"override config keys, e.g. {example}")
    wrong = config_lib.option_error(argv, config_class)
    if wrong is not None:  # `--steps 5`: argparse would only say "unrecognized arguments"
        return fail(f"{prog}: {wrong}")
    args = parser.parse_args(list(argv))

    def body() -> int:
        cfg = config_lib.load(config_class, args.config, args.overrides)
        shd.check_mesh(cfg.mesh)
        result = train(cfg, log=progress.log_line)
        if result.get("preempted"):
            return result["exit_code"]
        print(summary(result))
        return 0

    return run_command(prog, body)

