"""Nothing lost, on the real trainers, each in a subprocess: kill -9 at random points and resume
gives the same final state as an uninterrupted run (bitwise); SIGTERM saves and exits; a damaged
latest checkpoint falls back with a warning; a non-finite step stops (or is skipped) as
configured without touching what was saved."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
ENV = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}


def command(trainer, out, steps, ppo_inputs=None, *extra):
    """The CLI call of a short run of `trainer` writing to `out`, a checkpoint every step."""
    common = [f"out_dir={out}", "checkpoint.every=1", "checkpoint.keep=3", "export=false"]
    if trainer == "rm":
        args = ["--config", "configs/rm_tiny.yaml", f"steps={steps}", "eval_every=0",
                "log_every=1", "data.synthetic.num_train=512", "data.synthetic.num_eval=32",
                "normalise_after_training=false"]
    elif trainer == "sft":
        args = ["--config", "configs/sft_tiny.yaml", f"steps={steps}", "eval_every=0",
                "log_every=1", "data.synthetic.num_train=300", "data.synthetic.num_eval=20"]
    else:
        args = ["--config", "configs/ppo_tiny.yaml", f"iterations={steps}",
                f"policy={ppo_inputs / 'policy'}", f"reward_model={ppo_inputs / 'rm'}",
                f"prompts.train={ppo_inputs / 'prompts.jsonl'}", "prompts.eval_fraction=0",
                "batch_size=8", "sampling.max_new_tokens=6", "sample_every=0", "eval_every=0"]
    return [sys.executable, "-m", "rlhf_jax.cli", trainer, *args, *common, *extra]


def run(cmd, timeout=300):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    return proc.returncode, proc.stdout + proc.stderr


def saved_steps(out):
    path = pathlib.Path(out) / "checkpoints"
    if not path.exists():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit())


def final_state(out, step):
    import orbax.checkpoint as ocp

    state = ocp.PyTreeCheckpointer().restore(str(pathlib.Path(out) / "checkpoints" / str(step)
                                                 / "state"))
    return jax.tree_util.tree_leaves(state)


def start_and_wait_for_checkpoint(cmd, out, step, timeout=300):
    """Starts `cmd`; returns the process once a checkpoint of `step` or later exists."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(s >= step for s in saved_steps(out)):
            return proc
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before step {step}: "
                                 f"{proc.stdout.read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no checkpoint in time")


@pytest.mark.parametrize("trainer", ["rm", "sft", "ppo"])
def test_kill9_at_random_points_then_resume_is_bitwise_identical(trainer, tmp_path, ppo_inputs):
    steps = 6
    code, out = run(command(trainer, tmp_path / "ref", steps, ppo_inputs))
    assert code == 0, out[-2000:]
    reference = final_state(tmp_path / "ref", steps)
    rng = np.random.default_rng(sum(map(ord, trainer)))
    killed = tmp_path / "killed"
    for kill_after in sorted(rng.choice(np.arange(1, steps - 1), 2, replace=False)):
        proc = start_and_wait_for_checkpoint(command(trainer, killed, steps, ppo_inputs),
                                             killed, kill_after)
        time.sleep(rng.uniform(0, 0.3))  # anywhere in the next step or an async save
        proc.kill()
        proc.wait()
    code, out = run(command(trainer, killed, steps, ppo_inputs))
    assert code == 0, out[-2000:]
    assert "resumed from" in out
    for a, b in zip(reference, final_state(killed, steps)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("trainer", ["rm", "ppo"])
def test_sigterm_saves_and_exits_then_resumes(trainer, tmp_path, ppo_inputs):
    cmd = command(trainer, tmp_path, 400, ppo_inputs, "checkpoint.every=0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.stdout.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM, output[-2000:]
    assert "received SIGTERM" in output and "rerun the same command to resume" in output
    saved = saved_steps(tmp_path)
    assert len(saved) == 1 and 2 <= saved[0] < 400  # the step it was in, saved once
    code, out = run(command(trainer, tmp_path, saved[0] + 1, ppo_inputs))
    assert code == 0 and f"at step {saved[0]}" in out, out[-2000:]


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    code, out = run(command("rm", tmp_path, 3))
    assert code == 0, out[-2000:]
    assert saved_steps(tmp_path) == [1, 2, 3]
    latest = tmp_path / "checkpoints" / "3" / "state"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated mid-write
    code, out = run(command("rm", tmp_path, 4))
    assert code == 0, out[-2000:]
    assert "checkpoint at step 3" in out and "damaged" in out
    assert "resumed from the older checkpoint at step 2" in out
    assert (tmp_path / "checkpoints-damaged" / "3").is_dir()  # set aside, not deleted
    assert saved_steps(tmp_path)[-1] == 4


def test_non_finite_step_stops_and_keeps_the_saved_state(tmp_path):
    code, out = run(command("rm", tmp_path, 6, None, "optim.learning_rate=1e30"))
    assert code == 3, out[-2000:]
    line = [s for s in out.splitlines() if "non-finite" in s][-1]
    assert line.startswith("rlhf-jax rm: step ") and "last good checkpoint" in line
    bad = int(line.split("step ")[1].split(":")[0])
    assert saved_steps(tmp_path) == list(range(max(1, bad - 3), bad))  # nothing after it


def test_non_finite_step_skipped_when_configured(tmp_path):
    code, out = run(command("sft", tmp_path, 4, None, "optim.learning_rate=1e30",
                            "guard.on_non_finite=skip", "guard.max_skipped=2"))
    assert "update skipped (1/2 allowed)" in out
    assert code == 3 and "non-finite" in out.splitlines()[-1]  # then stops: out of skips
