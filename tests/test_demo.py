"""The embedded demo, shrunken: every stage runs and the report holds finite numbers."""

import json
import math
import os
import subprocess
import sys

from rlhf_jax.demo import world


def test_gold_judge_prefers_positive_finished_reviews():
    good = " the acting is great, and the story is moving. i loved it."
    bad = " the acting is dull, and the story is boring. i hated it."
    unfinished = " the acting is great, and the story"
    assert world.gold_reward("review of x:", good) > world.gold_reward("review of x:", bad)
    assert world.gold_reward("review of x:", good) > world.gold_reward("review of x:", unfinished)


def test_demo_cli_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "demo", "--out", str(out),
         "pretrain_steps=20", "pretrain_docs=300", "num_samples=3", "max_new_tokens=8"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert all(math.isfinite(summary[k]) for k in ("pretrain_loss_first", "pretrain_loss_last",
                                                    "gold_reward_mean"))
    assert summary["pretrain_loss_last"] < summary["pretrain_loss_first"]
    assert len(summary["samples"]) == 3
    assert (out / "report.md").exists() and (out / "base_model" / "config.json").exists()


def test_demo_rejects_unknown_option(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "demo", "--out", str(tmp_path), "pretrain_step=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "did you mean 'pretrain_steps'?" in proc.stdout
