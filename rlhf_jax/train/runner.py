"""The bookkeeping every trainer loop shares: resume, periodic saves, preemption, NaN guard.

    with Runner(out_dir, ckpt_cfg, guard_cfg, config=cfg) as run:
        start, state, meta = run.resume(state)             # newest readable checkpoint, or as given
        with run.preemptible():
            for step in range(start + 1, total + 1):
                state, metrics = train_step(state, batch(step))
                if not run.after_step(step, state, metrics, {"data_position": step}):
                    return run.exit_code()                 # preempted: saved; rerun resumes
        run.finish(total, state, meta)                     # a non-finite step raises instead

Steps are counted as completed updates: a checkpoint at step k holds the state after k
updates, and resuming from it runs update k + 1 next, on the batch that update would
have seen — so an interrupted and resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import os
import signal
import sys
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax.train.checkpoint import CheckpointConfig, CheckpointError, Checkpointer, abstract_like


class OnNonFinite(str, enum.Enum):
    STOP = "stop"  # stop the run, keep the last good checkpoint untouched
    SKIP = "skip"  # the step already kept the old state (see optim.apply_gradients_if_finite); go on


@dataclasses.dataclass(frozen=True)
class GuardConfig:
    """What to do when a step's loss, gradient norm or update norm is not finite.

    Attributes:
      on_non_finite: stop (default) or skip the step (the step function must keep the old
        state on a non-finite update; the loop then only counts and reports it).
      max_skipped: stop anyway after this many skipped steps.
    """

    on_non_finite: OnNonFinite = OnNonFinite.STOP
    max_skipped: int = 10


class NonFiniteError(RuntimeError):
    pass


GUARDED = ("loss", "grad_norm", "update_norm")


class Runner:
    def __init__(
        self,
        out_dir: str,
        ckpt: CheckpointConfig,
        guard: GuardConfig = GuardConfig(),
        config: Any = None,
        log: Callable[[str], None] = print,
    ):
        self.out_dir = out_dir
        self.ckpt_cfg = ckpt
        self.guard = guard
        self.config = config
        self.log = log
        self.skipped = 0
        self._stop_signal: Optional[int] = None
        self.checkpointer = Checkpointer(os.path.join(out_dir, "checkpoints"), keep=ckpt.keep,
                                         async_save=ckpt.async_save)
        if config is not None:
            os.makedirs(out_dir, exist_ok=True)
            config_lib.save_yaml(config, os.path.join(out_dir, "config.yaml"))

    def resume(self, state: Any) -> tuple[int, Any, dict]:
        """(completed steps, state, meta) from the newest readable checkpoint, else (0, state, {})."""
        if not self.ckpt_cfg.resume or not self.checkpointer.steps():
            return 0, state, {}
        step, restored, meta = self.checkpointer.restore(abstract_like(state), warn=self.log)
        self.log(f"resumed from {self.checkpointer.directory} at step {step}")
        return step, restored, meta

    @contextlib.contextmanager
    def preemptible(self):
        """SIGTERM / SIGINT only set a flag: the current step finishes, then `after_step` saves."""
        def handler(signum, _frame):
            self._stop_signal = signum
            self.log(f"received {signal.Signals(signum).name}: finishing this step, then saving")

        old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @property
    def preempted(self) -> bool:
        return self._stop_signal is not None

    def check_finite(self, step: int, metrics: Mapping[str, Any]) -> bool:
        """True when the step's guarded metrics are finite; else skip or raise, by config."""
        host = jax.device_get({k: metrics[k] for k in GUARDED if k in metrics})
        bad = [k for k in GUARDED if k in host and not math.isfinite(float(np.asarray(host[k])))]
        if not bad:
            return True
        what = ", ".join(f"{k}={float(np.asarray(host[k]))}" for k in bad)
        if self.guard.on_non_finite == OnNonFinite.SKIP and self.skipped < self.guard.max_skipped:
            self.skipped += 1
            self.log(f"step {step}: non-finite {what}; update skipped "
                     f"({self.skipped}/{self.guard.max_skipped} allowed)")
            return False
        raise NonFiniteError(
            f"step {step}: non-finite {what}. Stopped without saving this state; the last good "
            f"checkpoint in {self.checkpointer.directory} is untouched. Lower the learning rate, "
            "check the data for empty rows, or set guard.on_non_finite=skip."
        )

    def after_step(self, step: int, state: Any, metrics: Mapping[str, Any], meta: dict) -> bool:
        """Guards, saves on schedule or preemption; returns False when the loop must stop."""
        self.check_finite(step, metrics)
        every = self.ckpt_cfg.every
        if self.preempted or (every and step % every == 0):
            self.save(step, state, meta)
        if self.preempted:
            self.checkpointer.wait()
            self.log(f"stopped at step {step} on {signal.Signals(self._stop_signal).name}; "
                     f"checkpoint saved in {self.checkpointer.directory}; rerun the same command "
                     "to resume")
            return False
        return True

    def save(self, step: int, state: Any, meta: dict) -> None:
        cfg = {} if self.config is None else {"config": config_lib.to_dict(self.config)}
        self.checkpointer.save(step, state, {**meta, **cfg})

    def finish(self, step: int, state: Any, meta: dict) -> None:
        """Saves the final state (unless that step is already saved) and waits for the write."""
        self.checkpointer.wait()
        if step not in self.checkpointer.steps():
            self.save(step, state, meta)
        self.checkpointer.wait()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        """Waits for pending (good) saves and releases the checkpointer, also on errors."""
        self.checkpointer.close()

    def exit_code(self) -> int:
        """128 + signal number when preempted (the shell convention), else 0."""
        return 128 + self._stop_signal if self.preempted else 0


def fail(message: str, code: int = 2) -> int:
    """Prints a one-line error for the CLI and returns its exit code."""
    print(" ".join(str(message).split()), file=sys.stderr)
    return code


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Runs a command's body; bad input ends in one line on stderr and an exit code, not a
    traceback: 2 for config mistakes, 1 for unusable data, model files or checkpoints, 3 for a
    non-finite step. Anything else is a bug and keeps its traceback."""
    from rlhf_jax.data.formats import DataError
    from rlhf_jax.models.safetensors_io import ModelFileError

    try:
        return body()
    except config_lib.ConfigError as e:
        return fail(f"{prog}: {e}")
    except DataError as e:
        return fail(f"{prog}: data error: {e}", 1)
    except (ModelFileError, FileNotFoundError, CheckpointError) as e:
        return fail(f"{prog}: {e}", 1)
    except NonFiniteError as e:
        return fail(f"{prog}: {e}", 3)
