"""The demo's report: summary.json, plots of the trainers' metrics, and report.md."""

from __future__ import annotations

import json
import os

from rlhf_jax.train.logging import format_table, read_jsonl


def plots(out_dir: str) -> list[str]:
    """PNG curves from the trainers' metrics: RM loss/accuracy, PPO scores and KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = os.path.join(out_dir, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    written = []
    rm_rows = read_jsonl(os.path.join(out_dir, "runs", "rm", "metrics.jsonl"))
    train = [r for r in rm_rows if "train/accuracy" in r]
    evals = [r for r in rm_rows if "eval/accuracy" in r]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train")
    ax[0].plot([r["step"] for r in evals], [r["eval/loss"] for r in evals], "o-", label="held-out")
    ax[0].set(title="reward model loss", xlabel="step", ylabel="Bradley-Terry loss")
    ax[1].plot([r["step"] for r in train], [r["train/accuracy"] for r in train], label="train")
    ax[1].plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], "o-",
               label="held-out")
    ax[1].set(title="reward model accuracy", xlabel="step",
              ylabel="pairs ranked as labelled")
    for a in ax:
        a.legend()
    fig.tight_layout()
    written.append(os.path.join(plot_dir, "reward_model.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    rows = [r for r in read_jsonl(os.path.join(out_dir, "runs", "ppo", "metrics.jsonl"))
            if "env/score" in r]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.2))
    ax[0].plot(steps, [r["env/score"] for r in rows])
    ax[0].set(title="PPO: reward-model score", xlabel="iteration", ylabel="mean RM score")
    ax[1].plot(steps, [r.get("env/gold", float("nan")) for r in rows], color="tab:green")
    ax[1].set(title="PPO: gold reward (hidden judge)", xlabel="iteration",
              ylabel="mean gold reward")
    ax[2].plot(steps, [r["env/kl"] for r in rows], color="tab:red")
    ax[2].set(title="PPO: KL to the SFT reference", xlabel="iteration",
              ylabel="KL per response (nats)")
    fig.tight_layout()
    written.append(os.path.join(plot_dir, "ppo.png"))
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)
    return written


def _num(x) -> str:
    return "n/a (the judge ties every pair)" if x is None else f"{x:.3f}"


def write_report(out_dir: str, s: dict) -> None:
    """summary.json, plots/*.png and report.md of a finished demo run."""
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
    written = plots(out_dir)
    rmv = s["reward_model"]
    lines = [
        "# rlhf_jax demo report", "",
        "| stage | result |", "|---|---|",
        f"| pretraining | loss {s['pretrain_loss_first']:.3f} → {s['pretrain_loss_last']:.3f} |",
        f"| SFT | loss {s['sft_loss_first']:.3f} → {s['sft_loss_last']:.3f} |",
        f"| preferences | {s['preferences']['pairs']} pairs; noisy labels agree with the gold "
        f"judge on {s['preferences']['label_agreement_with_gold']:.2f} of them |",
        f"| reward model | held-out accuracy {_num(rmv['accuracy_vs_gold'])} against the gold "
        f"judge, {rmv['accuracy_vs_labels']:.3f} against the noisy labels "
        f"({rmv['held_out_pairs']} pairs) |",
        f"| PPO | last iteration: RM score {s['ppo_last_rm_score']:.3f}, KL {s['ppo_last_kl']:.3f} |",
        "", "## Held-out evaluation", "",
        "| policy | gold reward (mean ± std over prompts) | RM score |", "|---|---|---|",
        f"| SFT | {s['sft_gold_mean']:.3f} ± {s['sft_gold_std']:.3f} | {s['sft_rm_mean']:.3f} |",
        f"| PPO | {s['ppo_gold_mean']:.3f} ± {s['ppo_gold_std']:.3f} | {s['ppo_rm_mean']:.3f} |",
        "",
        f"PPO wins against SFT on {s['ppo_win_rate_vs_sft']:.2f} of the prompts by the gold "
        f"judge (ties count half), at a KL of {s['ppo_held_out_kl']:.3f} to the SFT reference "
        "(per response, on held-out prompts).", "",
        "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                s["stage_seconds"].items())
        + f"; total {s['seconds']:.0f}.", "",
        *[f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in written], "",
        "## Samples (same prompt and seed, before and after PPO)", "",
        format_table(s["samples"], ["prompt", "sft", "sft_gold", "ppo", "ppo_gold"], width=90),
    ]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def summary_lines(s: dict) -> list[str]:
    """The few lines `rlhf-jax demo` prints when it is done."""
    rmv = s["reward_model"]
    lines = [f"  reward model held-out accuracy vs gold judge: {_num(rmv['accuracy_vs_gold'])}",
             f"  gold reward  SFT {s['sft_gold_mean']:.3f} ± {s['sft_gold_std']:.3f}  →  "
             f"PPO {s['ppo_gold_mean']:.3f} ± {s['ppo_gold_std']:.3f}  (win rate "
             f"{s['ppo_win_rate_vs_sft']:.2f}, KL {s['ppo_held_out_kl']:.3f})"]
    for row in s["samples"][:3]:
        lines.append(f"  {row['prompt']}\n    SFT:{row['sft'].rstrip()}\n"
                     f"    PPO:{row['ppo'].rstrip()}")
    return lines
