"""PPO iteration benchmark: rlhf_jax's `PPOEngine` against TRL's `PPOTrainer`, same weights.

    python benchmarks/ppo.py [--shape small|base|all] [--repeats N] 2> ppo.log
    python benchmarks/ppo.py --shape llama-1b --dtype bfloat16 --no-peer   # on a GPU

For each shape, random GPT-2 models are built with rlhf_jax and saved in Hugging Face format:
the policy (causal LM; also the reference) and the reward model (sequence classification;
also where the separate critic starts, as in TRL's examples), plus a small BPE tokenizer.
rlhf_jax loads them back with `load_hf` and runs PPO iterations in this process; TRL 0.24 runs
the same directories in its own venv (benchmarks/peers/.venv-trl, see
benchmarks/peers/requirements-trl.txt) through benchmarks/peers/trl_ppo.py.

Matched settings: 16 prompts of 16–32 random tokens (left-padded to 32), 32 new tokens with
no stop token (every response is exactly 32 tokens), temperature 1, float32, 4 PPO epochs of
1 minibatch over policy and critic together (AdamW, no gradient clipping: TRL clips none),
k1 KL estimator, kl_coef 0.05, value clip 0.2, vf_coef 0.1, γ = 1, λ = 0.95.

Each side runs 1 + `--repeats` iterations, in lockstep: TRL's iteration i, then ours, then
TRL's i + 1 (TRL pauses in a callback meanwhile), so both see the same stretch of machine load
and never run at once. The first iteration of each (compilation for rlhf_jax, first-call
costs for TRL) is reported apart from the steady-state median. Phases: generate, score
(reference / critic / reward forwards; log π_old comes from the sampler on both sides: TRL
keeps its sampling logits, rlhf_jax runs with `rollout_logprobs=True` — plus rewards and
GAE) and update (epochs × minibatches of forward, backward and AdamW for policy and critic).

MFU uses `rlhf_jax.perf.matmul_ceiling` measured in this process over the models' matmul
shapes, and the model FLOPs of shared/DESIGN.md: forward 2·N per token, training 6·N, plus
attention (`models.flops_per_token`), with N without the LM head for the reward model and
critic. The counted work is the same for both sides (generation: prefill + one decode step
per new token; score: reference, critic and RM forwards over prompt + response; update:
epochs × training over prompt + response for policy and critic, the LM head on every column,
although rlhf_jax runs it only on the response columns).

`--no-peer` runs rlhf_jax alone (where TRL's venv is not installed, e.g. on an accelerator
machine); `--dtype bfloat16` computes in bfloat16 (float32 params and optimizer state), for
rlhf_jax only.

Writes benchmarks/results/ppo_<device>.json and prints a Markdown table; logs go to stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from rlhf_jax import models, perf  # noqa: E402
from rlhf_jax.train import optim  # noqa: E402
from rlhf_jax.rl import ppo as ppo_lib  # noqa: E402
from rlhf_jax.models.sampling import SamplingConfig, pad_prompts  # noqa: E402
from rlhf_jax.models import TransformerConfig, flops_per_token  # noqa: E402
from rlhf_jax.train.optim import OptimizerConfig  # noqa: E402
from rlhf_jax.stages.ppo import PPOEngine  # noqa: E402

from rlhf_jax.host_memory import freeze_live_objects  # noqa: E402
from common import (BATCH, EOS, PAD, PROMPT_LENGTHS, arg_parser, check_peer_args,  # noqa: E402
                    log, make_prompts, model_config, run_shapes)

NEW_TOKENS = 32
PPO_EPOCHS = 4
MINIBATCHES = 1
LEARNING_RATE = 3e-6
PEER_DIR = os.path.join(HERE, "peers")
PEER_PYTHON = os.path.join(PEER_DIR, ".venv-trl", "bin", "python")
PHASES = ("generate", "score", "update")


# ---------------------------------------------------------------------------------------------
# Shared with benchmarks/reward.py.


def save_tokenizer(path: str):
    """A small byte-level BPE (<pad>=0, <bos>=1, <eos>=2) saved at `path`; the benchmarks feed
    token ids directly, so only its special tokens matter."""
    from rlhf_jax.world.tiny import train_tokenizer

    texts = [f"the quick brown fox {i} jumps over the lazy dog {i * 7}" for i in range(200)]
    return train_tokenizer(texts, vocab_size=300, path=path)


def model_flops_per_token(cfg: TransformerConfig, seq_len: int, training: bool,
                          lm_head: bool = True) -> float:
    """`flops_per_token` (2·N forward, 6·N training, plus attention); without the LM head (a
    reward model or critic: the tied embedding is only a lookup there) 2·V·D less per pass."""
    f = flops_per_token(cfg, seq_len, training)
    if not lm_head:
        f -= (6 if training else 2) * cfg.vocab_size * cfg.hidden_size
    return f


def ceiling_flops_per_s(cfg: TransformerConfig, token_counts, earlier: dict = None,
                        dtype: str = "float32") -> dict:
    """The best measured matmul rate (rlhf_jax.perf) over the model's matmul shapes at each
    of `token_counts` rows, and every shape's rate; with `earlier` (a previous result, e.g.
    measured before the runs), each shape keeps the better of the two measurements, so that
    a burst of load from other work during one of them lowers the ceiling less."""
    shapes = sorted({s for t in token_counts for s in perf.matmul_shapes(cfg, t)})
    rates = {f"{m}x{k}x{n}": perf.matmul_flops_per_s(m, k, n, jnp.dtype(dtype))
             for m, k, n in shapes}
    if earlier:
        rates = {k: max(v, earlier["by_shape"].get(k, 0.0)) for k, v in rates.items()}
    return {"flops_per_s": max(rates.values()), "by_shape": rates}


def same_weights_check(paths: dict, ids: np.ndarray, mask: np.ndarray) -> dict:
    """Max |ours − transformers| of the policy's logits and of the reward model's scores on
    left-padded `ids` (transformers in this venv, positions counting real tokens as both
    libraries do): the two sides run the same models."""
    import torch
    import transformers

    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    pos_t = (mask_t.cumsum(-1) - 1).clamp(min=0)
    out = {}
    real = mask.astype(bool)
    with torch.inference_mode():
        if "policy" in paths:
            hf = transformers.AutoModelForCausalLM.from_pretrained(paths["policy"],
                                                                   dtype=torch.float32).eval()
            theirs = hf(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t).logits.numpy()
            model, params = models.load_hf(paths["policy"], head="lm")
            ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
            out["policy_logits_max_abs_diff"] = float(np.abs(ours[real] - theirs[real]).max())
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            paths["reward"], num_labels=1, dtype=torch.float32).eval()
        hf.config.pad_token_id = PAD
        theirs = hf(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t).logits[:, 0].numpy()
        model, params = models.load_hf(paths["reward"], head="reward")
        ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
        out["reward_scores_max_abs_diff"] = float(np.abs(ours - theirs).max())
        out["reward_scores_std"] = float(np.std(theirs))
    return out


def stats(times) -> dict:
    return perf.summary(times) if times else {}


def run_lockstep(script: str, args: list[str], log_path: str, ours_step, steps: int,
                 timeout: float = 3600, peer: bool = True) -> tuple[list, Optional[dict]]:
    """Runs a peer script (TRL venv) in lockstep with `ours_step(i)`: the peer does step i,
    pauses, then ours does step i, then the peer resumes; the two never run at once, and both
    see the same stretch of machine load. Returns (ours' results, the peer's JSON).
    The peer's stderr goes to `log_path`. Without `peer`: ours alone, (results, None)."""
    if not peer:
        return [ours_step(i) for i in range(steps)], None
    if not os.path.exists(PEER_PYTHON):
        raise SystemExit(f"{PEER_PYTHON} is missing: create it as benchmarks/peers/"
                         "requirements-trl.txt says")
    deadline = time.monotonic() + timeout
    ours, result = [], None
    with open(log_path, "w") as err:
        proc = subprocess.Popen([PEER_PYTHON, os.path.join(PEER_DIR, script), *args, "--lockstep"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True)

        def next_line(prefix: str) -> str:
            while True:
                line = proc.stdout.readline()
                if not line or time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    with open(log_path) as f:
                        tail = f.read()[-3000:]
                    raise RuntimeError(f"{script} stopped (exit {proc.returncode}):\n{tail}")
                if line.startswith(prefix):
                    return line[len(prefix):]

        try:
            for i in range(steps):
                json.loads(next_line("LOCKSTEP "))  # the peer's step i is done; it waits
                ours.append(ours_step(i))
                proc.stdin.write("\n")
                proc.stdin.flush()
            result = json.loads(next_line("RESULT "))
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return ours, result


def peer_versions() -> dict:
    out = subprocess.run([PEER_PYTHON, "-c", "import json, trl, transformers, torch, accelerate; "
                          "print(json.dumps({m.__name__: m.__version__ for m in "
                          "(trl, transformers, torch, accelerate)}))"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


# ---------------------------------------------------------------------------------------------
# PPO.


def ppo_flops(cfg: TransformerConfig, prompt_width: int) -> dict:
    """Model FLOPs of one PPO iteration's phases (see the module docstring)."""
    p, r, b = prompt_width, NEW_TOKENS, BATCH
    t = p + r
    gen = b * p * model_flops_per_token(cfg, p, False)  # prefill (the first new token)
    gen += sum(b * model_flops_per_token(cfg, p + i, False) for i in range(1, r))
    fwd_lm = model_flops_per_token(cfg, t, False)
    fwd_rm = model_flops_per_token(cfg, t, False, lm_head=False)
    score = b * t * (fwd_lm + 2 * fwd_rm)  # reference, critic, reward model
    update = PPO_EPOCHS * b * t * (model_flops_per_token(cfg, t, True)
                                   + model_flops_per_token(cfg, t, True, lm_head=False))
    return {"generate": gen, "score": score, "update": update,
            "iteration": gen + score + update}


class Ours:
    """rlhf_jax's PPO on the saved models: `PPOEngine` built here, one iteration per call."""

    def __init__(self, paths: dict, prompts, iterations: int, dtype: str = "float32"):
        # Unrolled layers (`scan_layers=False`): the faster setting on CPU (see README).
        load = dict(scan_layers=False, dtype=dtype)
        policy, policy_params = models.load_hf(paths["policy"], head="lm", **load)
        reward_model, reward_params = models.load_hf(paths["reward"], head="reward", **load)
        critic, critic_params = models.load_hf(paths["reward"], head="reward", **load)
        sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=0,
                                  top_p=1.0, stop_at_eos=False, prompt_bucket=0)
        ppo_cfg = ppo_lib.PPOConfig(ppo_epochs=PPO_EPOCHS, num_minibatches=MINIBATCHES,
                                    kl_estimator="k1", kl_coef=0.05, clip_eps=0.2,
                                    value_clip_eps=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
                                    temperature=1.0, rollout_logprobs=True)
        tx = optim.make_optimizer(OptimizerConfig(learning_rate=LEARNING_RATE, max_grad_norm=0.0,
                                                  b2=0.999), iterations * PPO_EPOCHS * MINIBATCHES)
        self.engine = PPOEngine(policy, critic, reward_model, ppo_cfg, sampling, tx,
                                eos_token_id=EOS, pad_token_id=PAD, seed=0)
        self.state = self.engine.init_state({"policy": policy_params, "critic": critic_params})
        self.frozen = {"ref": jax.tree_util.tree_map(jnp.copy, policy_params),
                       "reward": reward_params}
        ids, mask = pad_prompts(prompts, 0, PAD)
        self.ids, self.mask = jnp.asarray(ids), jnp.asarray(mask)
        jax.block_until_ready((self.state, self.frozen))

    def __call__(self, it: int) -> dict:
        start = time.perf_counter()
        self.state, metrics, rollout, _ = self.engine.iteration(self.state, self.frozen, self.ids,
                                                                self.mask, it)
        total = time.perf_counter() - start
        assert int(rollout.num_steps) == NEW_TOKENS, int(rollout.num_steps)
        times = {**metrics, "time/score": metrics["time/score"] + metrics["time/advantages"]}
        row = {**{k: times[f"time/{k}"] for k in PHASES}, "iteration": total,  # score: + GAE
               "response_length": metrics["env/response_length"]}
        log(f"  ours iteration {it}: " + ", ".join(f"{k} {row[k]:.3f} s"
                                                   for k in (*PHASES, "iteration")))
        return row


def summarise(side: dict, flops: dict, ceiling: float) -> dict:
    """Per-phase medians, spreads, shares, model FLOP/s and MFU of one side's iterations."""
    out = {"first_s": side["first"], "phases": {}}
    med_iter = perf.median([r["iteration"] for r in side["steady"]])
    for k in (*PHASES, "iteration"):
        times = [r[k] for r in side["steady"]]
        s = stats(times)
        s["share"] = s["median"] / med_iter
        s["first_minus_median_s"] = side["first"][k] - s["median"]
        s["model_flops"] = flops[k]
        s["model_flops_per_s"] = flops[k] / s["median"]
        s["mfu"] = s["model_flops_per_s"] / ceiling
        out["phases"][k] = s
    out["generated_tokens_per_s"] = BATCH * NEW_TOKENS / med_iter
    out["generate_tokens_per_s"] = BATCH * NEW_TOKENS / out["phases"]["generate"]["median"]
    return out


def bench_shape(shape: str, repeats: int, tmp: str, peer_threads: int, dtype: str = "float32",
                peer: bool = True) -> dict:
    cfg = model_config(shape)
    log(f"{shape}: building {cfg.num_layers} layers, width {cfg.hidden_size}, vocab "
        f"{cfg.vocab_size} ({cfg.num_params / 1e6:.1f} M params)")
    root = os.path.join(tmp, shape)
    tok_dir = os.path.join(root, "tokenizer")
    tok = save_tokenizer(tok_dir)
    paths = {"policy": os.path.join(root, "policy"), "reward": os.path.join(root, "reward")}
    policy, params = models.init_model(cfg, head="lm", seed=0)
    models.save_hf(paths["policy"], policy, params, tok)
    rm, rm_params = models.init_model(cfg, head="reward", seed=1)
    models.save_hf(paths["reward"], rm, rm_params, tok)
    del params, rm_params
    prompts = make_prompts(cfg.vocab_size)
    width = max(len(p) for p in prompts)
    prompts_path = os.path.join(root, "prompts.json")
    with open(prompts_path, "w") as f:
        json.dump(prompts, f)
    iterations = 1 + repeats
    ids, mask = pad_prompts(prompts, 0, PAD)
    check = same_weights_check(paths, ids, mask)
    log(f"{shape}: same weights: {check}")

    t = width + NEW_TOKENS
    ceiling_rows = [BATCH, BATCH * width, BATCH * t]
    log(f"{shape}: measuring the matmul ceiling")
    ceiling = ceiling_flops_per_s(cfg, ceiling_rows, dtype=dtype)
    load_before = perf.load_average()
    ours_step = Ours(paths, prompts, iterations, dtype)
    freeze_live_objects()  # set-up done (the TRL peer does the same before training)
    log(f"{shape}: {iterations} iterations " + ("each, TRL and rlhf_jax in turn" if peer
                                                 else "of rlhf_jax (no peer)"))
    ours_rows, theirs = run_lockstep("trl_ppo.py", [
        "--policy", paths["policy"], "--reward", paths["reward"], "--tokenizer", tok_dir,
        "--prompts", prompts_path, "--new-tokens", str(NEW_TOKENS), "--iterations",
        str(iterations), "--ppo-epochs", str(PPO_EPOCHS), "--minibatches", str(MINIBATCHES),
        "--learning-rate", str(LEARNING_RATE), "--threads", str(peer_threads),
    ], os.path.join(root, "trl_ppo.log"), ours_step, iterations, peer=peer)
    del ours_step
    if peer:
        for i, r in enumerate([theirs["first"], *theirs["steady"]]):
            log(f"  TRL iteration {i}: " + ", ".join(f"{k} {r[k]:.3f} s"
                                                     for k in (*PHASES, "iteration")))
        assert theirs["prompt_width"] == width, (theirs["prompt_width"], width)
    ours = {"first": ours_rows[0], "steady": ours_rows[1:]}
    log(f"{shape}: measuring the matmul ceiling again (each shape keeps its better rate)")
    ceiling = ceiling_flops_per_s(cfg, ceiling_rows, ceiling, dtype)
    flops = ppo_flops(cfg, width)
    o = summarise(ours, flops, ceiling["flops_per_s"])
    p = summarise(theirs, flops, ceiling["flops_per_s"]) if peer else None
    ratio = best = None
    if peer:
        ratio = {k: p["phases"][k]["median"] / o["phases"][k]["median"]
                 for k in (*PHASES, "iteration")}  # TRL seconds / our seconds (medians)
        best = {k: p["phases"][k]["min"] / o["phases"][k]["min"]
                for k in (*PHASES, "iteration")}  # the same from the fastest runs
    return {
        "shape": shape,
        "dtype": dtype,
        "config": {k: (v.value if hasattr(v, "value") else v)
                   for k, v in vars(cfg).items() if k != "rope_scaling"},
        "num_params": cfg.num_params,
        "batch": BATCH,
        "prompt_lengths": [len(p) for p in prompts],
        "prompt_width": width,
        "new_tokens": NEW_TOKENS,
        "same_weights_check": check,
        "sequence_length": t,
        "ppo_epochs": PPO_EPOCHS,
        "minibatches": MINIBATCHES,
        "repeats": repeats,
        "ours": {**o, "raw": ours},
        "trl": {**p, "raw": theirs} if peer else None,
        "speedup": ratio,  # TRL seconds / our seconds (medians), per phase and iteration
        "speedup_of_best": best,
        "ceiling_flops_per_s": ceiling["flops_per_s"],
        "matmul_flops_per_s": ceiling["by_shape"],
        "model_flops": flops,
        "peer_load_and_init_s": ({"load": theirs["load_s"], "init": theirs["init_s"]}
                                 if peer else None),
        "load_average": {"before": load_before, "after": perf.load_average()},
    }


def table(rows: list[dict]) -> str:
    head = ("| shape | side | iteration s (min–max) | generate s | score s | update s "
            "| shares g/s/u | gen tok/s | iteration MFU | update MFU | first iteration s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        for side in ("ours", "trl"):
            if r.get(side) is None:  # a run without the peer
                continue
            s = r[side]["phases"]
            lines.append(
                f"| {r['shape']} | {'rlhf_jax' if side == 'ours' else 'TRL'} "
                f"| {s['iteration']['median']:.2f} ({s['iteration']['min']:.2f}–{s['iteration']['max']:.2f}) "
                + "".join(f"| {s[k]['median']:.3f} " for k in PHASES)
                + "| " + "/".join(f"{100 * s[k]['share']:.0f}" for k in PHASES) + "% "
                f"| {r[side]['generate_tokens_per_s']:.0f} "
                f"| {100 * s['iteration']['mfu']:.1f}% | {100 * s['update']['mfu']:.1f}% "
                f"| {r[side]['first_s']['iteration']:.2f} |")
        sp = r["speedup"]
        if sp is None:
            continue
        best = r["speedup_of_best"]["iteration"]
        lines.append(f"| {r['shape']} | **ours / TRL speed** | **{sp['iteration']:.2f}×** "
                     f"(fastest: {best:.2f}×) "
                     + "".join(f"| {sp[k]:.2f}× " for k in PHASES) + "| | | | | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = arg_parser(__doc__, "ppo", "small", 3, "timed iterations after the first",
                    ours_alone=True)
    ap.add_argument("--peer-threads", type=int, default=perf.cpu_count(),
                    help="torch.set_num_threads for TRL (default: all CPUs, torch's own default)")
    args = ap.parse_args(argv)
    check_peer_args(args)
    result, out, rows = run_shapes(
        "ppo", args, lambda s, tmp: bench_shape(s, args.repeats, tmp, args.peer_threads,
                                                args.dtype, not args.no_peer),
        lambda rows: {
            "peer": None if args.no_peer else {
                "name": "trl.PPOTrainer", "versions": peer_versions(),
                "torch_threads": rows[0]["trl"]["raw"]["torch_threads"]},
            "settings": {"batch": BATCH, "new_tokens": NEW_TOKENS,
                         "prompt_lengths": PROMPT_LENGTHS,
                         "stop": "none (ours stop_at_eos=False; TRL stop_token=None)",
                         "dtype": args.dtype, "ppo_epochs": PPO_EPOCHS,
                         "minibatches": MINIBATCHES, "kl_estimator": "k1",
                         "critic": "separate (starts from the reward model)",
                         "optimizer": "AdamW, lr 3e-6, no clipping"},
        })
    device = result["device"]
    print(table(result["shapes"]))
    print(f"\n{device}, {args.dtype}, batch {BATCH}, prompts {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]} "
          f"tokens, {NEW_TOKENS} new tokens, {PPO_EPOCHS} epochs × {MINIBATCHES} minibatch; "
          f"steady state = median of {args.repeats} iterations after the first; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
