"""The embedded demo, shrunken: every stage runs and the report holds finite numbers."""

import json
import math
import os
import subprocess
import sys

from rlhf_jax.world import movies as world


def test_gold_judge_prefers_positive_finished_reviews():
    good = " the acting is great, and the story is moving. i loved it."
    bad = " the acting is dull, and the story is boring. i hated it."
    unfinished = " the acting is great, and the story"
    assert world.gold_reward("review of x:", good) > world.gold_reward("review of x:", bad)
    assert world.gold_reward("review of x:", good) > world.gold_reward("review of x:", unfinished)


def test_demo_cli_runs_every_stage(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "demo", "--out", str(out),
         "pretrain_steps=20", "pretrain_docs=300", "sft_examples=100", "sft_steps=5",
         "preference_prompts=96", "rm_epochs=1", "ppo_iterations=2", "ppo_batch_size=8",
         "eval_prompts=8", "num_samples=3", "max_new_tokens=8"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report:" in proc.stdout
    s = json.loads((out / "summary.json").read_text())
    numbers = [s["pretrain_loss_first"], s["pretrain_loss_last"], s["sft_loss_first"],
               s["sft_loss_last"], s["reward_model"]["accuracy_vs_labels"], s["ppo_last_kl"],
               s["ppo_held_out_kl"], s["sft_gold_mean"], s["ppo_gold_mean"], s["sft_rm_mean"],
               s["ppo_rm_mean"], s["ppo_win_rate_vs_sft"]]
    assert all(math.isfinite(x) for x in numbers), numbers
    assert s["pretrain_loss_last"] < s["pretrain_loss_first"]
    rmv = s["reward_model"]  # a barely trained policy may write only pairs the judge ties
    assert rmv["accuracy_vs_gold"] is None or 0 <= rmv["accuracy_vs_gold"] <= 1
    assert (rmv["accuracy_vs_gold"] is None) == (rmv["gold_ties_left_out"] == rmv["held_out_pairs"])
    assert s["preferences"]["pairs"] > 32 and 0 <= s["ppo_win_rate_vs_sft"] <= 1
    assert len(s["samples"]) == 3
    report = (out / "report.md").read_text()
    assert "gold reward" in report and "win" in report
    for path in ("plots/reward_model.png", "plots/ppo.png", "data/preferences.jsonl",
                 "data/prompts.jsonl", "models/sft/config.json", "models/reward/config.json",
                 "models/ppo/config.json"):
        assert (out / path).exists(), path
    row = json.loads((out / "data" / "preferences.jsonl").read_text().splitlines()[0])
    assert set(row) == {"prompt", "chosen", "rejected"}
    assert "\r" not in proc.stderr and "5/6 PPO: 2/2 iterations (100%)" in proc.stderr
    for stage in ("sft", "rm", "ppo"):
        events = os.listdir(out / "runs" / stage / "tensorboard")
        assert len(events) == 1, (stage, events)


def test_every_plot_names_its_axes(tmp_path, monkeypatch):
    import matplotlib.figure

    from rlhf_jax.demo import report

    runs = tmp_path / "runs"
    (runs / "rm").mkdir(parents=True)
    (runs / "ppo").mkdir()
    (runs / "rm" / "metrics.jsonl").write_text(
        '{"step": 1, "train/loss": 0.7, "train/accuracy": 0.5}\n'
        '{"step": 2, "eval/loss": 0.6, "eval/accuracy": 0.6}\n')
    (runs / "ppo" / "metrics.jsonl").write_text(
        '{"step": 1, "env/score": 0.1, "env/gold": 0.2, "env/kl": 0.0}\n')
    labels = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: labels.extend(
        (ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes))
    assert len(report.plots(str(tmp_path))) == 2
    assert len(labels) == 5 and all(x and y for x, y in labels), labels


def test_demo_rejects_unknown_option(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "demo", "--out", str(tmp_path), "pretrain_step=3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "did you mean 'pretrain_steps'?" in proc.stdout
