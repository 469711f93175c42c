"""Orbax checkpoints of whole training runs: train states, RNG, data position, config.

A checkpoint is a step directory with two items: `state` (any pytree of arrays: train
states, RNG key data, controller state) and `meta` (JSON: step, data position, resolved
config, anything small). Orbax writes each step into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoints intact.
Restoring walks from the newest step back to older ones, skipping (and reporting) any
that cannot be read.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from rlhf_jax.config import check

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When and how checkpoints are written.

    Attributes:
      every: save every this many steps (0 = only at the end).
      keep: keep the newest this many checkpoints.
      async_save: write in a background thread while training goes on.
      resume: continue from the newest complete checkpoint in the output directory, if any.
      resume_with_changes: resume even when the config differs from the saved run's in more
        than its length, logging and checkpointing (each start's config is kept in
        config_history.yaml either way).
    """

    every: int = 0
    keep: int = 2
    async_save: bool = True
    resume: bool = True
    resume_with_changes: bool = False

    def __post_init__(self):
        check(self.every >= 0, "every", self.every, "0 (only at the end) or a positive step count")
        check(self.keep >= 1, "keep", self.keep, "1 or more")


class CheckpointError(RuntimeError):
    pass


class Checkpointer:
    """Saves and restores `(state pytree, meta dict)` pairs under `directory`."""

    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts saving (returns before the write ends when async); `wait()` to be sure."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "step": step})
            ),
            force=True,
        )

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore(
        self, abstract_state: Any, step: Optional[int] = None, warn: Callable[[str], None] = log.warning
    ) -> tuple[int, Any, dict]:
        """Restores the newest readable checkpoint (or exactly `step`).

        Args:
          abstract_state: pytree of `jax.ShapeDtypeStruct` (with shardings) that the state
            restores into, e.g. `jax.eval_shape` of the init with shardings attached.
          step: a specific step; None = newest, falling back to older ones when damaged.
          warn: where to report a damaged checkpoint that was skipped.

        Returns:
          (step, state, meta).
        """
        candidates = [step] if step is not None else list(reversed(self.steps()))
        if not candidates:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        errors = []
        for s in candidates:
            try:
                restored = self._manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
                _check_shapes(restored["state"], abstract_state)
            except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
                errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                warn(f"checkpoint at step {s} in {self.directory} is damaged or unreadable "
                     f"({errors[-1]}); trying an older one")
                continue
            if errors:
                warn(f"resumed from the older checkpoint at step {s}")
                self._set_aside([c for c in candidates if c > s], warn)
            return s, restored["state"], dict(restored["meta"])
        raise CheckpointError(
            f"no readable checkpoint in {self.directory}: " + "; ".join(errors)
            + ". Delete the directory (or pick another output directory) to start afresh."
        )

    def _set_aside(self, steps: list[int], warn: Callable[[str], None]) -> None:
        """Moves damaged checkpoints out of the way (to <directory>-damaged/<step>), so the
        resumed run can save those steps again; nothing is deleted."""
        aside = self.directory.rstrip("/") + "-damaged"
        os.makedirs(aside, exist_ok=True)
        for s in steps:
            target = os.path.join(aside, str(s))
            if os.path.exists(target):
                target += f".{int(time.time())}"
            os.replace(os.path.join(self.directory, str(s)), target)
            warn(f"moved the damaged checkpoint of step {s} to {target}")
        self._manager.reload()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def _check_shapes(state: Any, abstract: Any) -> None:
    got = jax.tree_util.tree_map(lambda x: tuple(x.shape), state)
    want = jax.tree_util.tree_map(lambda x: tuple(x.shape), abstract)
    if got != want:
        raise CheckpointError(f"restored shapes {got} differ from the expected {want}")


def abstract_like(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s with the shardings of `tree`'s arrays (a restore target)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
