"""Nothing lost: kill -9 and resume, SIGTERM, NaN guard — on a toy trainer in a subprocess."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

TOY = str(pathlib.Path(__file__).with_name("toy_trainer.py"))
ENV = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}


def run(out, *args, timeout=120):
    proc = subprocess.run([sys.executable, TOY, str(out), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=ENV)
    return proc.returncode, proc.stdout + proc.stderr


def final(output):
    return [line.split()[1] for line in output.splitlines() if line.startswith("FINAL")][-1]


def start_and_wait_for(out, step, *args):
    """Starts the toy trainer, returns it once it has printed STEP `step`."""
    proc = subprocess.Popen([sys.executable, TOY, str(out), *map(str, args)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == f"STEP {step}":
            return proc, lines
    raise AssertionError("".join(lines))


def test_kill9_at_random_points_then_resume_gives_identical_params(tmp_path):
    code, out = run(tmp_path / "ref", 12)
    assert code == 0
    reference = final(out)
    rng = np.random.default_rng(0)
    run_dir = tmp_path / "killed"
    for kill_at in sorted(rng.choice(np.arange(2, 12), 3, replace=False)):
        proc, _ = start_and_wait_for(run_dir, kill_at, 12, "sleep=0.05")
        time.sleep(rng.uniform(0, 0.05))  # anywhere inside the next step or save
        proc.kill()
        proc.wait()
    code, out = run(run_dir, 12)
    assert code == 0, out
    assert "resumed from" in out
    assert final(out) == reference  # bitwise: same digest of the float32 params


def test_sigterm_finishes_the_step_saves_and_exits_cleanly(tmp_path):
    proc, _ = start_and_wait_for(tmp_path, 3, 50, "every=0", "sleep=0.2")
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert "checkpoint saved" in rest and "rerun the same command to resume" in rest
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 3
    code, out = run(tmp_path, saved[-1] + 2)
    assert code == 0 and f"START {saved[-1]}" in out


def test_nan_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    code, out = run(tmp_path, 10, "nan_at=5")
    assert code == 3
    assert "step 5: non-finite loss=nan" in out and "last good checkpoint" in out
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [2, 4]  # nothing written after the bad step


def test_nan_skip_mode_skips_the_update_and_finishes(tmp_path):
    code, out = run(tmp_path, 8, "nan_at=5", "on_non_finite=skip")
    assert code == 0, out
    assert "step 5: non-finite" in out and "update skipped" in out
    assert "nan" not in final(out)
