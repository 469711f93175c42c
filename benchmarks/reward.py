"""Reward-model step benchmark: rlhf_jax's `rm.train_step` against TRL's `RewardTrainer`.

    python benchmarks/reward.py [--shape small|base|all] [--repeats N] 2> reward.log
    python benchmarks/reward.py --shape llama-1b --dtype bfloat16 --no-peer   # on a GPU

For each shape a random GPT-2 sequence-classification model is built with rlhf_jax and saved
in Hugging Face format with a small tokenizer; rlhf_jax loads it back (`load_hf`) and TRL 0.24
runs the same directory in its own venv (benchmarks/peers/.venv-trl) through
benchmarks/peers/trl_reward.py.

Matched settings: 16 preference pairs per optimizer step, chosen and rejected each 64 random
tokens (no padding), float32, one forward over the 32 sequences, Bradley–Terry loss,
backward, gradient clipping at 1.0 and AdamW (β2 0.999), no gradient checkpointing on
either side. rlhf_jax's step is the reward stage's jitted `train_step` (`compile_steps`) (state donated, the
batch already on device); TRL's is its trainer's optimizer step, timed from `on_step_begin`
to `on_step_end` (the batch already collated). The two take turns, one step each (TRL pauses
in a callback meanwhile), so both see the same machine load. The first step (compilation for rlhf_jax,
first-call costs for TRL) is reported apart from the steady-state median.

MFU: training FLOPs 6·N per token plus attention (N without the LM head: the tied embedding
is only a lookup in a reward model) over the 2 × 16 × 64 tokens, against
`rlhf_jax.perf`'s matmul ceiling measured in this process at the model's matmul shapes.

`--no-peer` and `--dtype` as in benchmarks/ppo.py (rlhf_jax alone; bfloat16 compute).

Writes benchmarks/results/reward_<device>.json and prints a Markdown table; logs to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import arg_parser, check_peer_args, log, model_config, run_shapes  # noqa: E402
from ppo import (ceiling_flops_per_s, model_flops_per_token, peer_versions,  # noqa: E402
                 run_lockstep, same_weights_check, save_tokenizer)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import models, perf  # noqa: E402
from rlhf_jax.train import optim  # noqa: E402
from rlhf_jax.stages import rm  # noqa: E402
from rlhf_jax.train.supervised import compile_steps  # noqa: E402
from rlhf_jax import sharding as shd  # noqa: E402
from rlhf_jax.host_memory import freeze_live_objects  # noqa: E402
from rlhf_jax.train.optim import OptimizerConfig  # noqa: E402

PAIRS = 16
SEQ_LEN = 64
LEARNING_RATE = 1e-5


def make_pairs(vocab_size: int, steps: int, seed: int = 0) -> list[dict]:
    """PAIRS × steps pairs of SEQ_LEN random ids ≥ 3 (no pad / bos / eos), all one length."""
    rng = np.random.default_rng(seed)
    return [{"chosen_input_ids": rng.integers(3, vocab_size, SEQ_LEN).tolist(),
             "rejected_input_ids": rng.integers(3, vocab_size, SEQ_LEN).tolist()}
            for _ in range(PAIRS * steps)]


class Ours:
    """rlhf_jax's reward-model step (as the rm stage compiles it) on the saved model, one per
    call."""

    def __init__(self, path: str, pairs: list[dict], steps: int, dtype: str = "float32"):
        model, params = models.load_hf(path, head="reward", scan_layers=False,  # faster on CPU
                                       dtype=dtype)
        self.mesh = shd.make_mesh((1, -1, 1))
        tx = optim.make_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, b2=0.999,
                                                  max_grad_norm=1.0), steps)
        cfg = rm.RMConfig(batch_size=PAIRS, margin_scale=0.0)
        self.state, shardings = optim.sharded_state(models.abstract_params(model), params, tx,
                                                    self.mesh)
        del params
        self.train_fn, _ = compile_steps(rm.STAGE, cfg, model, tx, self.mesh, shardings)
        self.batches = []
        for s in range(steps):
            rows = pairs[s * PAIRS:(s + 1) * PAIRS]
            ids = np.array([[r["chosen_input_ids"], r["rejected_input_ids"]] for r in rows],
                           np.int32)
            batch = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                     "margin": np.zeros(PAIRS, np.float32), "weight": np.ones(PAIRS, np.float32)}
            self.batches.append(jax.device_put(batch, rm.batch_shardings(cfg, self.mesh)))
        jax.block_until_ready((self.state, self.batches))

    def __call__(self, s: int) -> dict:
        with shd.use_mesh(self.mesh):
            start = time.perf_counter()
            self.state, metrics = self.train_fn(self.state, self.batches[s])
            jax.block_until_ready((self.state, metrics))
            elapsed = time.perf_counter() - start
        log(f"  ours step {s}: {elapsed:.3f} s (loss {float(metrics['loss']):.4f})")
        return {"step": elapsed}


def summarise(side: dict, flops: float, ceiling: float) -> dict:
    s = perf.summary([r["step"] for r in side["steady"]])
    out = {"first_step_s": side["first"]["step"], "step": s,
           "first_minus_median_s": side["first"]["step"] - s["median"],
           "pairs_per_s": PAIRS / s["median"],
           "tokens_per_s": 2 * PAIRS * SEQ_LEN / s["median"],
           "model_flops_per_s": flops / s["median"], "mfu": flops / s["median"] / ceiling}
    if "interval" in side["steady"][0]:
        out["interval_with_data"] = perf.summary([r["interval"] for r in side["steady"]])
    return out


def bench_shape(shape: str, repeats: int, tmp: str, peer_threads: int, dtype: str = "float32",
                peer: bool = True) -> dict:
    cfg = model_config(shape)
    log(f"{shape}: building {cfg.num_layers} layers, width {cfg.hidden_size}, vocab "
        f"{cfg.vocab_size} ({cfg.num_params / 1e6:.1f} M params)")
    root = os.path.join(tmp, shape)
    tok_dir = os.path.join(root, "tokenizer")
    tok = save_tokenizer(tok_dir)
    path = os.path.join(root, "reward")
    model, params = models.init_model(cfg, head="reward", seed=1)
    models.save_hf(path, model, params, tok)
    del params
    steps = 1 + repeats
    pairs = make_pairs(cfg.vocab_size, steps)
    pairs_path = os.path.join(root, "pairs.json")
    with open(pairs_path, "w") as f:
        json.dump(pairs, f)
    ids = np.array([p["chosen_input_ids"] for p in pairs[:4]], np.int32)
    check = same_weights_check({"reward": path}, ids, np.ones_like(ids))
    log(f"{shape}: same weights: {check}")

    tokens = 2 * PAIRS * SEQ_LEN
    log(f"{shape}: measuring the matmul ceiling")
    ceiling = ceiling_flops_per_s(cfg, [tokens], dtype=dtype)
    load_before = perf.load_average()
    ours_step = Ours(path, pairs, steps, dtype)
    freeze_live_objects()  # set-up done (the TRL peer does the same before training)
    log(f"{shape}: {steps} steps " + ("each, TRL and rlhf_jax in turn" if peer
                                      else "of rlhf_jax (no peer)"))
    ours_rows, theirs = run_lockstep("trl_reward.py", [
        "--model", path, "--tokenizer", tok_dir, "--pairs", pairs_path, "--batch", str(PAIRS),
        "--steps", str(steps), "--learning-rate", str(LEARNING_RATE),
        "--threads", str(peer_threads),
    ], os.path.join(root, "trl_reward.log"), ours_step, steps, peer=peer)
    del ours_step
    ours = {"first": ours_rows[0], "steady": ours_rows[1:]}
    for i, r in enumerate([theirs["first"], *theirs["steady"]] if peer else []):
        log(f"  TRL step {i}: {r['step']:.3f} s ({r['interval']:.3f} s with data)")
    log(f"{shape}: measuring the matmul ceiling again (each shape keeps its better rate)")
    ceiling = ceiling_flops_per_s(cfg, [tokens], ceiling, dtype)
    flops = tokens * model_flops_per_token(cfg, SEQ_LEN, True, lm_head=False)
    o = summarise(ours, flops, ceiling["flops_per_s"])
    p = summarise(theirs, flops, ceiling["flops_per_s"]) if peer else None
    return {
        "shape": shape,
        "dtype": dtype,
        "config": {k: (v.value if hasattr(v, "value") else v)
                   for k, v in vars(cfg).items() if k != "rope_scaling"},
        "num_params": cfg.num_params,
        "pairs": PAIRS,
        "sequence_length": SEQ_LEN,
        "repeats": repeats,
        "same_weights_check": check,
        "ours": {**o, "raw": ours},
        "trl": {**p, "raw": theirs} if peer else None,
        # TRL s / our s: medians, and the fastest steps
        "speedup": p["step"]["median"] / o["step"]["median"] if peer else None,
        "speedup_of_best": p["step"]["min"] / o["step"]["min"] if peer else None,
        "model_flops_per_step": flops,
        "ceiling_flops_per_s": ceiling["flops_per_s"],
        "matmul_flops_per_s": ceiling["by_shape"],
        "load_average": {"before": load_before, "after": perf.load_average()},
    }


def table(rows: list[dict]) -> str:
    head = ("| shape | side | step s (min–max) | pairs/s | tokens/s | MFU | first step s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        for side in ("ours", "trl"):
            s = r[side]
            if s is None:  # a run without the peer
                continue
            lines.append(
                f"| {r['shape']} | {'rlhf_jax' if side == 'ours' else 'TRL'} "
                f"| {s['step']['median']:.3f} ({s['step']['min']:.3f}–{s['step']['max']:.3f}) "
                f"| {s['pairs_per_s']:.1f} | {s['tokens_per_s']:.0f} | {100 * s['mfu']:.1f}% "
                f"| {s['first_step_s']:.2f} |")
        if r["speedup"] is not None:
            lines.append(f"| {r['shape']} | **ours / TRL speed** | **{r['speedup']:.2f}×** "
                         f"(fastest steps: {r['speedup_of_best']:.2f}×) | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = arg_parser(__doc__, "reward", "small", 5, "timed steps after the first",
                    ours_alone=True)
    ap.add_argument("--peer-threads", type=int, default=perf.cpu_count(),
                    help="torch.set_num_threads for TRL (default: all CPUs, torch's own default)")
    args = ap.parse_args(argv)
    check_peer_args(args)
    result, out, rows = run_shapes(
        "reward", args, lambda s, tmp: bench_shape(s, args.repeats, tmp, args.peer_threads,
                                                   args.dtype, not args.no_peer),
        lambda rows: {
            "peer": None if args.no_peer else {
                "name": "trl.RewardTrainer", "versions": peer_versions(),
                "torch_threads": rows[0]["trl"]["raw"]["torch_threads"]},
            "settings": {"pairs": PAIRS, "sequence_length": SEQ_LEN, "dtype": args.dtype,
                         "optimizer": "AdamW, lr 1e-5, β2 0.999, clip 1.0",
                         "gradient_checkpointing": False},
        })
    device = result["device"]
    print(table(result["shapes"]))
    print(f"\n{device}, {args.dtype}, {PAIRS} pairs × 2 × {SEQ_LEN} tokens per step; steady state = "
          f"median of {args.repeats} steps after the first; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
