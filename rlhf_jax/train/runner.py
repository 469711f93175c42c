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
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
import yaml

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


GUARDED = ("loss", "grad_norm", "update_norm")  # under any prefix: "ppo/loss" is guarded too

CONFIG_FILE = "config.yaml"  # the config of the latest start of the run
HISTORY_FILE = "config_history.yaml"  # one YAML document per start: the run's whole record


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
            self._record_config(config)

    def _record_config(self, config: Any) -> None:
        """Refuses to resume a run whose config changed (beyond `RESUMABLE_KEYS`) unless
        `checkpoint.resume_with_changes`; then writes config.yaml and appends it to
        config_history.yaml. Nothing is written when the run is refused."""
        current = config_lib.to_dict(config)
        saved_path = os.path.join(self.out_dir, CONFIG_FILE)
        resuming = self.ckpt_cfg.resume and bool(self.checkpointer.steps())
        changed: list[str] = []
        if resuming and os.path.exists(saved_path):
            with open(saved_path, encoding="utf-8") as f:
                saved = yaml.safe_load(f) or {}
            changed = changed_keys(saved, current)
            allowed = getattr(config, "RESUMABLE_KEYS", ())
            refused = [k for k in changed if not _under(k, allowed)]
            if refused and not self.ckpt_cfg.resume_with_changes:
                raise config_lib.ConfigError(refused[0], _refusal(self.out_dir, refused, saved,
                                                                  current))
        if jax.process_index() != 0:
            return
        os.makedirs(self.out_dir, exist_ok=True)
        record = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "resumed": resuming, "changed": changed, "config": current}
        with open(os.path.join(self.out_dir, HISTORY_FILE), "a", encoding="utf-8") as f:
            f.write("---\n" + yaml.safe_dump(record, sort_keys=False))
        config_lib.save_yaml(config, saved_path)

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
        guarded = sorted((k for k in metrics if k.rsplit("/", 1)[-1] in GUARDED),
                         key=lambda k: GUARDED.index(k.rsplit("/", 1)[-1]))
        host = jax.device_get({k: metrics[k] for k in guarded})
        bad = [k for k in guarded if not math.isfinite(float(np.asarray(host[k])))]
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


def changed_keys(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key), current.get(key)
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += changed_keys(a, b, path)
        elif a != b:
            out.append(path)
    return out


def _under(key: str, sections: Sequence[str]) -> bool:
    return any(key == s or key.startswith(s + ".") for s in sections)


def _lookup(tree: Mapping, key: str):
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


def _refusal(out_dir: str, keys: list[str], saved: Mapping, current: Mapping) -> str:
    shown = "; ".join(f"{k}: {_lookup(saved, k)!r} -> {_lookup(current, k)!r}" for k in keys[:4])
    more = f" (and {len(keys) - 4} more)" if len(keys) > 4 else ""
    return (f"{out_dir} holds a run made with another config ({shown}{more}); resuming would "
            "continue it under the new values. Use a new out_dir, or checkpoint.resume=false to "
            "start afresh there, or checkpoint.resume_with_changes=true to continue with them")


def fail(message: str, code: int = 2) -> int:
    """Prints a one-line error for the CLI and returns its exit code."""
    print(" ".join(str(message).split()), file=sys.stderr)
    return code


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Runs a command's body; bad input ends in one line on stderr and an exit code, not a
    traceback: 2 for config mistakes, 1 for unusable data, model files or checkpoints, 3 for a
    non-finite step. Anything else is a bug and keeps its traceback."""
    from rlhf_jax.data import DataError
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
