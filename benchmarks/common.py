"""What the benchmark scripts share: model shapes, random prompts, and the JSON record."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from rlhf_jax import perf  # noqa: E402
from rlhf_jax.host_memory import retain_freed_memory  # noqa: E402

retain_freed_memory()  # as the CLI does; the peer scripts apply the same glibc settings
import jax  # noqa: E402

# Compile times are first calls: a persistent compilation cache (JAX_COMPILATION_CACHE_DIR,
# or one left set by other code) must not serve them.
jax.config.update("jax_compilation_cache_dir", None)
from rlhf_jax.models import TransformerConfig  # noqa: E402

SHAPES = {  # GPT-2-shaped; `--shape all` runs these
    "small": dict(num_layers=4, hidden_size=256, num_heads=4, vocab_size=2048),
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, vocab_size=8192),
}
# For an accelerator (named with --shape only): Llama-3.2-1B's trunk (16 layers, width 2048,
# 32 query / 8 key-value heads, MLP 8192, tied embeddings) with a 32k vocabulary: 1.1 B params.
ACCELERATOR_SHAPES = {
    "llama-1b": dict(num_layers=16, hidden_size=2048, num_heads=32, num_kv_heads=8,
                     intermediate_size=8192, vocab_size=32000),
}
# A real-size model for CPU first-call times (named with --shape only; benchmarks/first_call.py):
# Qwen2-0.5B's shape (24 layers, width 896, 14 query / 2 key-value heads, MLP 4864, a
# 151 936-token vocabulary, tied embeddings): 494 M params, 2 GB in float32.
REAL_SHAPES = {
    "qwen2-0.5b": dict(num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2,
                       intermediate_size=4864, vocab_size=151936),
}
ALL_SHAPES = [*SHAPES, *ACCELERATOR_SHAPES, *REAL_SHAPES]
DTYPES = ("float32", "bfloat16")
BATCH = 16
PROMPT_LENGTHS = (16, 32)  # inclusive range of real prompt tokens
PAD, BOS, EOS = 0, 1, 2
RESULTS = os.path.join(HERE, "results")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_config(shape: str) -> TransformerConfig:
    """The model of `shape`: GPT-2-shaped (MLP 4 × width, tied embeddings) for SHAPES,
    Llama-shaped for ACCELERATOR_SHAPES (256 positions), Qwen2-shaped for REAL_SHAPES (Qwen2's
    32 768 positions, RoPE base 10⁶, q/k/v biases). Params are float32 (what is saved); a run
    in bfloat16 computes in it (`dtype` override at load)."""
    ids = dict(max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=PAD,
               bos_token_id=BOS, eos_token_id=EOS)
    if shape in REAL_SHAPES:
        ids["max_position_embeddings"] = 32768
        return TransformerConfig(family="qwen2", qkv_bias=True, rope_theta=1e6, norm_eps=1e-6,
                                 **REAL_SHAPES[shape], **ids)
    if shape in ACCELERATOR_SHAPES:
        return TransformerConfig(family="llama", qkv_bias=False, rope_theta=500000.0,
                                 **ACCELERATOR_SHAPES[shape], **ids)
    s = SHAPES[shape]
    return TransformerConfig(family="gpt2", intermediate_size=4 * s["hidden_size"],
                             qkv_bias=True, **s, **ids)


def make_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    """BATCH random prompts, lengths spread over PROMPT_LENGTHS (both ends included); ids ≥ 3
    (no pad / bos / eos inside a prompt)."""
    rng = np.random.default_rng(seed)
    lo, hi = PROMPT_LENGTHS
    lengths = rng.integers(lo, hi + 1, BATCH)
    lengths[:2] = (lo, hi)
    return [rng.integers(3, vocab_size, n).tolist() for n in lengths]


def run_record(benchmark: str) -> dict:
    """The head of a result file: benchmark, command, date, device and environment."""
    return {
        "benchmark": benchmark,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "device": perf.device_label(),
        "environment": perf.environment(),
    }


def write_results(out: str, result: dict, shapes: list[str]) -> None:
    """Writes `result` to `out`; rows of shapes not run this time are kept from the old file."""
    if os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
        kept = [r for r in old.get("shapes", []) if r["shape"] not in shapes]
        result["shapes"] = sorted(kept + result["shapes"],
                                  key=lambda r: ALL_SHAPES.index(r["shape"]))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


def arg_parser(doc: str, benchmark: str, default_shape: str, default_repeats: int,
               repeats_help: str, ours_alone: bool = False) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --shape, --repeats, --out; with `ours_alone`
    also --dtype and --no-peer (see `check_peer_args`)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    if ours_alone:
        ap.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype of rlhf_jax (bfloat16: rlhf_jax alone, --no-peer)")
        ap.add_argument("--no-peer", action="store_true",
                        help="run rlhf_jax alone (no peer venv needed, e.g. on an accelerator)")
    ap.add_argument("--shape", choices=[*ALL_SHAPES, "all"], default=default_shape,
                    help=f"'all' is {' and '.join(SHAPES)}")
    ap.add_argument("--repeats", type=int, default=default_repeats, help=repeats_help)
    ap.add_argument("--out",
                    help=f"JSON path (default benchmarks/results/{benchmark}_<device>.json)")
    return ap


def check_peer_args(args) -> None:
    """The peers run float32 on the CPU with the GPT-2 shapes: anything else needs --no-peer."""
    if args.no_peer:
        return
    if args.dtype != "float32":
        raise SystemExit(f"--dtype {args.dtype} applies to rlhf_jax alone (the peer runs "
                         "float32 on the CPU): add --no-peer")
    if args.shape in ACCELERATOR_SHAPES:
        raise SystemExit(f"--shape {args.shape} is for an accelerator, where the peer's venv "
                         "is not installed: add --no-peer")


def run_shapes(benchmark: str, args, bench_shape, describe) -> tuple[dict, str, list[dict]]:
    """Runs `bench_shape(shape, tmp_dir)` for each shape `args.shape` names, writes the result
    file (`describe(rows)` adds the benchmark's own fields; rows of shapes not run are kept
    from the old file) and returns (result, its path, this run's rows)."""
    shapes = list(SHAPES) if args.shape == "all" else [args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_shape(s, tmp) for s in shapes]
    result = run_record(benchmark)
    out = args.out or os.path.join(RESULTS, f"{benchmark}_{result['device']}.json")
    result.update({**describe(rows), "shapes": rows})
    write_results(out, result, shapes)
    return result, out, rows
