"""Orbax checkpoints: exact round trip, newest-first restore with fallback past damage."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.train.checkpoint import Checkpointer, CheckpointError, abstract_like


def state_at(step):
    return {"params": {"w": jnp.full((4, 3), float(step)), "b": jnp.arange(3.0) + step},
            "rng": jax.random.key_data(jax.random.PRNGKey(step))}


def test_round_trip_keep_and_fallback(tmp_path):
    ckpt = Checkpointer(str(tmp_path), keep=2, async_save=True)
    for step in (1, 2, 3):
        ckpt.save(step, state_at(step), {"data_position": step * 10})
    ckpt.wait()
    assert ckpt.steps() == [2, 3]  # keeps the newest two
    target = abstract_like(state_at(0))
    step, state, meta = ckpt.restore(target)
    assert step == 3 and meta["data_position"] == 30 and meta["step"] == 3
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, state_at(3))

    # damage the newest: delete its array data files
    newest = os.path.join(str(tmp_path), "3", "state")
    for root, _, files in os.walk(newest):
        for f in files:
            if not f.endswith(".json") and "metadata" not in f:
                os.remove(os.path.join(root, f))
    warnings = []
    step, state, meta = Checkpointer(str(tmp_path)).restore(target, warn=warnings.append)
    assert step == 2 and meta["data_position"] == 20
    assert any("step 3" in w and "damaged" in w for w in warnings)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state, state_at(2))
    ckpt.close()


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        Checkpointer(str(tmp_path)).restore(abstract_like(state_at(0)))
