"""Generation benchmark: rlhf_jax's rollout engine against transformers' `generate`, same weights.

    python benchmarks/generate.py [--shape small|base|all] [--repeats N] 2> bench.log
    python benchmarks/generate.py --shape llama-1b --dtype bfloat16   # on a GPU

For each shape a random GPT-2 model is built with rlhf_jax, saved in Hugging Face format and
loaded back by both rlhf_jax (`load_hf`) and transformers (`AutoModelForCausalLM`, eval).
Both sample 64 new tokens (temperature 1, no top-k / top-p, KV cache on, no early stop) for
the same 16 left-padded random prompts of 16–32 tokens. Timed calls alternate between the two;
the first rlhf_jax call (compilation) is timed apart from the steady-state ones. Tokens/s
counts new tokens only: batch × 64 / seconds per call.

rlhf_jax runs twice per repeat: on one device (the default), and data-parallel over the host
CPU devices, one per core (`--xla_force_host_platform_device_count`, set below before jax is
imported): params replicated, the 16 rows split 8 + 8, the same program as on a mesh of
accelerators (`rlhf_jax.sharding`). At small widths a decode step is per-op overhead, which the
two devices overlap; at base width it is memory-bound and each device streams the weights
itself, so one device is faster. Both are reported; the ratio uses the faster.

On CPU rlhf_jax decodes from column panels of the weights (rlhf_jax/models/panels.py) where
`panels.panels_pay` says they pay (the small and base shapes; not llama-1b's 6 388 panels),
cut on the host once per set of params; every call here reuses them, as a run over many
batches does. The cut is timed apart (`ours_panels_cut_s`) and `ratio_with_panel_cut` is the
ratio if every call paid for one (as each PPO iteration does, with new params).

The ceiling comes from `rlhf_jax.perf`, measured in this process: the best matmul rate over
the model's matmul shapes and the streaming read bandwidth give the fastest a generate call
of this shape could run (prefill plus 63 decode steps, each bound by compute or by memory).

`--dtype bfloat16` runs both in bfloat16 (weights cast to it: inference); transformers runs on
CUDA when torch sees a GPU, else on the CPU; `--no-peer` times rlhf_jax alone. The logits
check always compares float32 models on the CPU.

Writes benchmarks/results/generate_<device>.json (environment, settings, every raw time) and
prints a Markdown table (stdout); progress goes to stderr.
"""

from __future__ import annotations

import os
import sys
import time

# One host device per core (only the CPU backend reads it): the data-parallel run below.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={os.cpu_count()}").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from rlhf_jax.models import sampling as gen  # noqa: E402
from rlhf_jax.models.panels import cpu_decode_panels, panels_pay  # noqa: E402
from rlhf_jax import models, perf  # noqa: E402
from rlhf_jax import sharding as shd  # noqa: E402
from rlhf_jax.host_memory import freeze_live_objects  # noqa: E402
from common import (BATCH, PAD, PROMPT_LENGTHS, arg_parser, log,  # noqa: E402
                    make_prompts, model_config, run_shapes)

NEW_TOKENS = 64


def bench_shape(shape: str, repeats: int, tmp: str, dtype: str = "float32",
                peer: bool = True) -> dict:
    import torch
    import transformers

    cfg = model_config(shape)
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    load_before = perf.load_average()
    log(f"{shape}: building {cfg.num_layers} layers, width {cfg.hidden_size}, vocab {cfg.vocab_size}")
    path = os.path.join(tmp, shape)
    model, params = models.init_model(cfg, head="lm", seed=0)
    models.save_hf(path, model, params)
    del params
    model, params = models.load_hf(path, head="lm")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    prompts = make_prompts(cfg.vocab_size)
    sampling = gen.SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=1.0, top_k=0,
                                  top_p=1.0, stop_at_eos=False, prompt_bucket=0)
    ids, mask = gen.pad_prompts(prompts, sampling.prompt_bucket, PAD)  # [B, P] left-padded
    width = ids.shape[1]
    ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
    ids_t = torch.tensor(ids, dtype=torch.long)
    mask_t = torch.tensor(mask, dtype=torch.long)

    # Same weights: the two models' logits on the prompts agree (positions count real tokens,
    # as `generate` computes them in both libraries).
    pos_t = (mask_t.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        theirs_logits = hf(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t).logits.numpy()
    ours_logits = np.asarray(model.apply({"params": params}, ids_j, mask_j))
    real = mask.astype(bool)
    logits_diff = float(np.abs(ours_logits[real] - theirs_logits[real]).max())
    log(f"{shape}: max |logits ours - transformers| at real tokens = {logits_diff:.2e}")
    if dtype != "float32":  # inference in `dtype`: the weights themselves cast to it
        model = model.clone(cfg=model.cfg.replace(dtype=dtype))
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), params)
    hf = hf.to(device=torch_device, dtype=torch_dtype) if peer else None
    ids_t, mask_t = ids_t.to(torch_device), mask_t.to(torch_device)

    # One function per set of params: each keeps the decode panels of the params it saw last.
    ours_fn, dp_fn = (gen.make_generate_fn(model, sampling) for _ in range(2))
    prefill_fn = gen.make_generate_fn(model, gen.SamplingConfig(
        max_new_tokens=1, temperature=1.0, stop_at_eos=False, prompt_bucket=0))

    def cut_panels():
        """Seconds to cut and place the decode panels (once per params; None: not used)."""
        start = time.perf_counter()
        panels = cpu_decode_panels(model.cfg, params)
        jax.block_until_ready(panels)
        return None if panels is None else time.perf_counter() - start

    def ours(fn, seed):
        start = time.perf_counter()
        out = fn(params, ids_j, mask_j, jax.random.key(seed))
        out.tokens.block_until_ready()
        return time.perf_counter() - start, out

    # Data-parallel over the host devices (when there are several and they divide the batch).
    devices = jax.local_devices(backend="cpu") if jax.default_backend() == "cpu" else []
    dp = len(devices) if len(devices) > 1 and BATCH % len(devices) == 0 else 0
    if dp:
        mesh = shd.make_mesh((dp, 1, 1), devices)
        params_dp = jax.device_put(params, shd.replicated(mesh))
        with shd.use_mesh(mesh):
            ids_dp, mask_dp = shd.shard_batch((ids_j, mask_j), mesh)

    def ours_dp(seed):
        with shd.use_mesh(mesh):
            start = time.perf_counter()
            out = dp_fn(params_dp, ids_dp, mask_dp, jax.random.key(seed))
            out.tokens.block_until_ready()
            return time.perf_counter() - start, out

    def theirs(seed):
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(
                input_ids=ids_t, attention_mask=mask_t, do_sample=True, temperature=1.0,
                top_k=0, top_p=1.0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                pad_token_id=PAD, use_cache=True,
            )
        if torch_device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        assert out.shape == (BATCH, width + NEW_TOKENS), out.shape
        return elapsed

    freeze_live_objects()  # set-up done: full garbage collections stop rescanning it
    first_s, out = ours(ours_fn, 0)
    assert int(out.num_steps) == NEW_TOKENS and (np.asarray(out.lengths) == NEW_TOKENS).all()
    prefill_first_s, _ = ours(prefill_fn, 0)
    if dp:
        dp_first_s, out_dp = ours_dp(0)
        same = np.array_equal(np.asarray(out_dp.tokens), np.asarray(out.tokens))
        log(f"{shape}: data-parallel over {dp} host devices: first call {dp_first_s:.2f} s, "
            f"same tokens as one device: {same}")
    theirs_first_s = theirs(0) if peer else None  # transformers' warm-up call
    log(f"{shape}: first calls (ours incl. compile {first_s:.2f} s, prefill-only "
        f"{prefill_first_s:.2f} s" + (f", transformers {theirs_first_s:.2f} s)" if peer else ")"))
    # The machine's rates are measured between the timed calls too, so that they see the
    # same load as the calls (the machine may be shared).
    shapes = perf.matmul_shapes(cfg, BATCH) + perf.matmul_shapes(cfg, BATCH * width)
    panels = panels_pay(model.cfg) and cut_panels() is not None  # as make_generate_fn decides
    times = {"ours": [], **({"transformers": []} if peer else {}), "ours_prefill": [],
             **({"ours_dp": []} if dp else {}), **({"panels": []} if panels else {})}
    rates = {f"{m}x{k}x{n}": [] for m, k, n in shapes}
    bandwidth = []
    for i in range(1, repeats + 1):
        times["ours"].append(ours(ours_fn, i)[0])
        if peer:
            times["transformers"].append(theirs(i))
        times["ours_prefill"].append(ours(prefill_fn, i)[0])
        if dp:
            times["ours_dp"].append(ours_dp(i)[0])
        if panels:
            times["panels"].append(cut_panels())
        for m, k, n in shapes:
            rates[f"{m}x{k}x{n}"].append(perf.matmul_flops_per_s(m, k, n, jnp.dtype(dtype),
                                                                 repeats=3))
        bandwidth.append(perf.memory_bandwidth_bytes_per_s(repeats=3))
        log(f"{shape}: repeat {i}/{repeats}: ours {times['ours'][-1]:.3f} s, "
            + (f"transformers {times['transformers'][-1]:.3f} s, " if peer else "")
            + f"ours prefill-only {times['ours_prefill'][-1]:.3f} s, "
            + (f"ours data-parallel {times['ours_dp'][-1]:.3f} s, " if dp else "")
            + (f"panels cut {times['panels'][-1]:.3f} s, " if panels else "") +
            f"best matmul {max(r[-1] for r in rates.values()) / 1e9:.0f} GFLOP/s, "
            f"read {bandwidth[-1] / 1e9:.1f} GB/s")

    new = BATCH * NEW_TOKENS
    t_ours = perf.median(times["ours"])
    t_prefill = perf.median(times["ours_prefill"])
    ours_tps = new / t_ours
    theirs_tps = new / perf.median(times["transformers"]) if peer else None
    dp_tps = new / perf.median(times["ours_dp"]) if dp else None
    best_tps = max(ours_tps, dp_tps or 0.0)
    decode_tps = BATCH * (NEW_TOKENS - 1) / max(t_ours - t_prefill, 1e-9)

    flops_per_s = max(perf.median(r) for r in rates.values())
    bytes_per_s = perf.median(bandwidth)
    prompt_len = float(np.mean([len(p) for p in prompts]))
    context = prompt_len + NEW_TOKENS / 2  # mean context of the decode steps
    weight_bytes = jnp.dtype(dtype).itemsize
    bounds = perf.decode_bounds(cfg, BATCH, int(round(context)), flops_per_s, bytes_per_s,
                                weight_bytes)
    ceiling = perf.generate_ceiling_tokens_per_s(cfg, BATCH, prompt_len, NEW_TOKENS,
                                                 flops_per_s, bytes_per_s, weight_bytes)
    return {
        "shape": shape,
        "dtype": dtype,
        "transformers_device": torch_device if peer else None,
        "config": {k: (v.value if hasattr(v, "value") else v)
                   for k, v in vars(cfg).items() if k != "rope_scaling"},
        "num_params": cfg.num_params,
        "batch": BATCH,
        "prompt_lengths": [len(p) for p in prompts],
        "prompt_width": width,
        "new_tokens": NEW_TOKENS,
        "logits_max_abs_diff": logits_diff,
        "times_s": times,
        "first_call_s": {"ours": first_s, "ours_prefill": prefill_first_s,
                         "ours_data_parallel": dp_first_s if dp else None,
                         "transformers": theirs_first_s},  # None without the peer
        "ours_compile_s": first_s - t_ours,
        "ours_tokens_per_s": ours_tps,
        "transformers_tokens_per_s": theirs_tps,
        "ratio": ours_tps / theirs_tps if peer else None,
        "host_devices": dp or 1,
        "ours_data_parallel_tokens_per_s": dp_tps,
        "ours_data_parallel_same_tokens": bool(same) if dp else None,
        "ours_best_tokens_per_s": best_tps,
        "ratio_best": best_tps / theirs_tps if peer else None,
        "ours_prefill_s": t_prefill,
        # Decode panels: cut once per params (not in the timed calls, which reuse them);
        # the ratio if every call paid for a new cut.
        "ours_decode_panels": panels,
        "ours_panels_cut_s": perf.median(times["panels"]) if panels else None,
        "ratio_with_panel_cut": (new / (t_ours + perf.median(times["panels"])) / theirs_tps
                                 if panels and peer else None),
        "ours_decode_tokens_per_s": decode_tps,
        "times_summary": {k: perf.summary(v) for k, v in times.items()},
        "matmul_flops_per_s": rates,
        "flops_per_s": flops_per_s,
        "bandwidth_bytes_per_s_raw": bandwidth,
        "bandwidth_bytes_per_s": bytes_per_s,
        "decode_context": context,
        "decode_ceiling": bounds,
        "generate_ceiling_tokens_per_s": ceiling,
        "fraction_of_ceiling": ours_tps / ceiling,
        "best_fraction_of_ceiling": best_tps / ceiling,
        "decode_fraction_of_ceiling": decode_tps / bounds["tokens_per_s"],
        "load_average": {"before": load_before, "after": perf.load_average()},
    }


def table(rows: list[dict]) -> str:
    head = ("| shape | ours tok/s (1 device) | ours tok/s (data-parallel) | transformers tok/s "
            "| ratio (best) | our compile s | ceiling tok/s | best / ceiling "
            "| ours decode tok/s (1 device) | decode ceiling tok/s (bound) | decode / ceiling |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        d = r["decode_ceiling"]
        dp_tps = r.get("ours_data_parallel_tokens_per_s")
        dp = f"{dp_tps:.0f} ({r['host_devices']} devices)" if dp_tps else "—"
        theirs = r["transformers_tokens_per_s"]
        lines.append(
            f"| {r['shape']} | {r['ours_tokens_per_s']:.0f} | {dp} "
            + (f"| {theirs:.0f} | {r['ratio_best']:.2f}× " if theirs else "| — | — ")
            + f"| {r['ours_compile_s']:.1f} "
            f"| {r['generate_ceiling_tokens_per_s']:.0f} "
            f"| {100 * r['best_fraction_of_ceiling']:.0f}% | {r['ours_decode_tokens_per_s']:.0f} "
            f"| {d['tokens_per_s']:.0f} ({d['bound']}) | {100 * r['decode_fraction_of_ceiling']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = arg_parser(__doc__, "generate", "all", 5, "timed calls of each engine per shape",
                    ours_alone=True)
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count(),
                    help="torch.set_num_threads for transformers (default: all CPUs)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.torch_threads)
    result, out, rows = run_shapes(
        "generate", args, lambda s, tmp: bench_shape(s, args.repeats, tmp, args.dtype,
                                                     not args.no_peer),
        lambda rows: {
            "peer": None if args.no_peer else "transformers.generate",
            "dtype": args.dtype,
            "torch_threads": torch.get_num_threads(),
            "sampling": {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "kv_cache": True,
                         "stop": "none (ours stop_at_eos=False; transformers min_new_tokens=64)"},
            "batch": BATCH,
            "new_tokens": NEW_TOKENS,
            "repeats": args.repeats,
        })
    device = result["device"]
    print(table(result["shapes"]))
    loads = [r["load_average"]["before"][0] for r in rows if r["load_average"]["before"]]
    print(f"\n{device}, {args.dtype}, batch {BATCH}, prompts {PROMPT_LENGTHS[0]}-{PROMPT_LENGTHS[1]} "
          f"tokens, {NEW_TOKENS} new tokens, median of {args.repeats}, torch threads "
          f"{torch.get_num_threads()}, 1-min load average at start {loads}; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
