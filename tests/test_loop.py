"""The run frame every stage shares (rlhf_jax/train/loop.py), as a user meets it: through the
command line in a subprocess. Resume refuses a changed config and keeps each start's config;
a finished run resumed again logs nothing twice; progress in a redirected log is plain lines;
bad model paths name their key."""

import os
import pathlib
import subprocess
import sys

import yaml

from rlhf_jax.train.logging import read_jsonl

ROOT = pathlib.Path(__file__).resolve().parent.parent
RM = ["rm", "--config", "configs/rm_tiny.yaml", "data.synthetic.num_train=96",
      "data.synthetic.num_eval=16", "batch_size=16", "log_every=1", "checkpoint.every=2",
      "export=false"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rlhf_jax.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def history(out) -> list[dict]:
    with open(out / "config_history.yaml") as f:
        return list(yaml.safe_load_all(f))


def test_resume_refuses_a_changed_config_and_keeps_every_start(tmp_path):
    out = tmp_path / "rm"
    first = run_cli(*RM, f"out_dir={out}", "steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "\r" not in first.stderr  # a redirected log gets whole lines, not a redrawn bar
    assert "rm: 3/3 steps (100%)" in first.stderr
    saved = (out / "config.yaml").read_text()

    changed = run_cli(*RM, f"out_dir={out}", "steps=5", "optim.learning_rate=1e-3")
    assert changed.returncode == 2
    (line,) = changed.stderr.strip().splitlines()
    assert "optim.learning_rate" in line and "0.003 -> 0.001" in line, line
    assert "new out_dir" in line and "checkpoint.resume=false" in line
    assert "checkpoint.resume_with_changes=true" in line
    assert (out / "config.yaml").read_text() == saved  # the record of the first run is kept
    assert len(history(out)) == 1

    longer = run_cli(*RM, f"out_dir={out}", "steps=5")  # the run's length may change
    assert longer.returncode == 0, longer.stderr[-3000:]
    starts = history(out)
    assert [s["resumed"] for s in starts] == [False, True]
    assert starts[1]["changed"] == ["steps"] and starts[1]["config"]["steps"] == 5
    evals = [r["step"] for r in read_jsonl(str(out / "metrics.jsonl")) if "eval/loss" in r]
    assert evals == [3, 5]

    again = run_cli(*RM, f"out_dir={out}", "steps=5")  # nothing left to do
    assert again.returncode == 0, again.stderr[-3000:]
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows if "eval/loss" in r] == [3, 5]  # no second final eval
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5]

    meant = run_cli(*RM, f"out_dir={out}", "steps=6", "optim.learning_rate=1e-3",
                    "checkpoint.resume_with_changes=true")
    assert meant.returncode == 0, meant.stderr[-3000:]
    assert history(out)[-1]["changed"] == ["checkpoint.resume_with_changes", "optim.learning_rate",
                                           "steps"]

    fresh = run_cli(*RM, f"out_dir={out}", "steps=2", "checkpoint.resume=false")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    events = os.listdir(out / "tensorboard")
    assert len([e for e in events if e.startswith("events.out")]) == 1, events
    rows = read_jsonl(str(out / "metrics.jsonl"))
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]


def test_a_missing_model_directory_names_its_key(ppo_inputs, tmp_path):
    proc = run_cli("ppo", "--config", "configs/ppo_tiny.yaml", f"out_dir={tmp_path}",
                   f"policy={tmp_path / 'no_such_policy'}", f"reward_model={ppo_inputs / 'rm'}",
                   f"prompts.train={ppo_inputs / 'prompts.jsonl'}")
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "config key 'policy'" in line and "does not exist" in line, line
    assert "tokenizer" not in line


def test_bfloat16_on_cpu_is_said_to_be_slower(ppo_inputs, tmp_path):
    # The warning comes before anything is loaded: a run stopped by its data still shows it.
    proc = run_cli(*RM, f"out_dir={tmp_path}", "model.dtype=bfloat16", "data.synthetic=null",
                   f"model.tokenizer={ppo_inputs / 'tok'}",
                   f"data.train={tmp_path / 'missing.jsonl'}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "warning: dtype bfloat16 on the CPU runs slower than float32" in proc.stdout
    assert "missing.jsonl" in proc.stderr
