"""First calls on a real-size model: what a user waits for before the first token.

    python benchmarks/first_call.py [--shape qwen2-0.5b|base] [--model-dir DIR] 2> first_call.log
    python benchmarks/first_call.py --parts sft,rm        # the first training steps only

Builds a random model of `--shape` (default: Qwen2-0.5B's shape, 494 M params, saved as
sharded safetensors with `models.save_hf`) and a small byte-level BPE tokenizer trained with
the `tokenizers` library (nothing is downloaded), then times, each in a fresh process with
the compilation cache off (`RLHF_JAX_COMPILE_CACHE=off`, no `JAX_COMPILATION_CACHE_DIR`):

* `generate`: in a worker process, `load_hf` (unrolled layers, as the command loads them),
  then the first `make_generate_fn` call (tracing, compilation and one run), once with the
  decode panels (rlhf_jax/models/panels.py) and once without; the process with the panels
  then compiles the other setting too and times `--steady` calls of each, alternating, so
  that both see the same machine load. The break-even is the number of calls after which
  the panels' longer first call is paid back by their shorter steady calls.
* `command`: the whole `rlhf-jax generate` command (process start to exit) on a prompts file
  of one batch, as a user runs it: the panels are what `panels.panels_pay` picks.
* `sft`, `rm`: the whole `rlhf-jax sft` / `rlhf-jax rm` command for one step with
  `export=false` on generated data files (`--stage-args` adds or overrides `key=value`s: the
  trainers' command lines may change).

Work: `--batch` rows (8) of prompts of 16–32 tokens, `--new-tokens` (32) new tokens each, no
early stop; SFT and RM: `--batch` rows (pairs) of `--max-length` tokens.

Writes benchmarks/results/first_call_<device>.json (environment, shapes, every time) and
prints a Markdown table (stdout); progress goes to stderr. `--model-dir` keeps the built model
for the next run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (BOS, EOS, PAD, PROMPT_LENGTHS, RESULTS, log, model_config,  # noqa: E402
                    run_record, write_results)

import numpy as np  # noqa: E402

from rlhf_jax import perf  # noqa: E402

PARTS = ("generate", "command", "sft", "rm")
WORDS = ("the film was a great movie with a boring plot and bad acting but I loved the music "
         "of its long opening scene while my friend slept through the quiet ending").split()


def sentence(rng, n_words: int) -> str:
    return " ".join(rng.choice(WORDS, n_words))


def build(shape: str, path: str) -> None:
    """A random model of `shape` and a small BPE tokenizer in `path` (kept when there)."""
    stamp = os.path.join(path, "first_call_shape.txt")
    if os.path.exists(stamp) and open(stamp).read() == shape:
        log(f"reusing the {shape} model in {path}")
        return
    import jax

    from rlhf_jax import models
    from rlhf_jax.world.tiny import train_tokenizer

    cfg = model_config(shape)
    log(f"building {shape}: {cfg.num_layers} layers, width {cfg.hidden_size}, vocabulary "
        f"{cfg.vocab_size}, {cfg.num_params / 1e6:.0f} M params")
    rng = np.random.default_rng(0)
    tokenizer = train_tokenizer([sentence(rng, 12) for _ in range(500)], 512)
    specials = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert specials == (PAD, BOS, EOS), specials
    model, params = models.init_model(cfg, seed=0)
    # Shards of at most 1 GiB: a 2 GB model is read from several files, as real ones are.
    models.save_hf(path, model, jax.device_get(params), tokenizer, max_shard_bytes=1 << 30)
    with open(stamp, "w") as f:
        f.write(shape)


def prompt_texts(n: int, seed: int = 0) -> list[str]:
    """n prompts of roughly PROMPT_LENGTHS tokens (the BPE above makes most words one token)."""
    rng = np.random.default_rng(seed)
    lo, hi = PROMPT_LENGTHS
    return [sentence(rng, int(k)) for k in rng.integers(lo // 2, hi // 2 + 1, n)]


# ---------------------------------------------------------------------------------------------
# In a fresh process: the generate calls (`--worker`).


def worker(args) -> None:
    """Loads the model as `rlhf-jax generate` does, times the first generate call with the
    panels on or off (`args.panels`) and `args.steady` more calls, and prints one JSON line.
    With `args.interleave` the other setting is compiled too (untimed) and the steady calls
    alternate between the two, so that both see the same machine load. (common.py has set up
    the process as the CLI does: `retain_freed_memory`, no compilation cache.)"""
    import jax

    from rlhf_jax import models
    from rlhf_jax.host_memory import freeze_live_objects
    from rlhf_jax.models import panels, sampling

    start = time.perf_counter()
    model, params = models.load_hf(args.model_dir, head="lm", scan_layers=False)
    jax.block_until_ready(params)
    tokenizer = models.load_tokenizer(args.model_dir)
    loaded = time.perf_counter()
    cfg = sampling.SamplingConfig(max_new_tokens=args.new_tokens, stop_at_eos=False)
    ids, mask = sampling.tokenize_prompts(tokenizer, prompt_texts(args.batch), cfg,
                                          model.cfg.max_position_embeddings)
    settings = [args.panels] + ([{"on": "off", "off": "on"}[args.panels]] if args.interleave
                                else [])
    fns = {p: sampling.make_generate_fn(model, cfg, cpu_panels=p == "on") for p in settings}
    freeze_live_objects()

    def call(p: str, seed: int) -> float:
        t = time.perf_counter()
        out = fns[p](params, ids, mask, jax.random.key(seed))
        out.tokens.block_until_ready()
        assert int(out.num_steps) == args.new_tokens
        return time.perf_counter() - t

    first = call(args.panels, 0)
    for p in settings[1:]:
        call(p, 0)  # compiled here, not timed: this process is no longer fresh
    steady = {p: [] for p in settings}
    for seed in range(1, 1 + args.steady):
        for p in settings:
            steady[p].append(call(p, seed))
    print(json.dumps({
        "panels": args.panels == "on", "load_s": loaded - start, "first_call_s": first,
        "steady_s": steady, "prompt_width": int(ids.shape[1]),
        "panel_count": panels.panel_count(model.cfg),
        "panels_pay": panels.panels_pay(model.cfg), "load_average": perf.load_average(),
    }))


# ---------------------------------------------------------------------------------------------
# The parent: fresh processes, timed from outside.


def fresh_env() -> dict:
    """The environment of every timed process: no compilation cache of any kind."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(RLHF_JAX_COMPILE_CACHE="off", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error")
    return env


def timed(argv: list[str], what: str) -> tuple[dict, subprocess.CompletedProcess]:
    """Runs `argv` in a fresh process from the repository root; ({seconds (wall), date,
    load average}, the finished process)."""
    log(f"{what}: {' '.join(argv[1:])}")
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=os.path.dirname(HERE), env=fresh_env(), capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit code {proc.returncode}):\n{proc.stderr[-3000:]}")
    log(f"{what}: {elapsed:.1f} s")
    return {"seconds": elapsed, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "load_average": perf.load_average()}, proc


def generate_calls(args, panels: str, interleave: bool) -> dict:
    when, proc = timed([sys.executable, __file__, "--worker", "calls", "--model-dir",
                        args.model_dir, "--panels", panels, "--batch", str(args.batch),
                        "--new-tokens", str(args.new_tokens), "--steady", str(args.steady)]
                       + (["--interleave"] if interleave else []),
                       f"generate calls, panels {panels}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**row, "steady_median_s": {p: perf.median(t) for p, t in row["steady_s"].items()},
            "date_utc": when["date_utc"]}


def command(args, tmp: str) -> dict:
    """The whole `rlhf-jax generate` on one batch of prompts."""
    prompts = os.path.join(tmp, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("\n".join(prompt_texts(args.batch)) + "\n")
    argv = [sys.executable, "-m", "rlhf_jax.cli", "generate", "--model", args.model_dir,
            "--prompts", prompts, "--out", os.path.join(tmp, "out.jsonl"), "--batch-size",
            str(args.batch), "--max-new-tokens", str(args.new_tokens), "--no-stop-at-eos"]
    when, proc = timed(argv, "rlhf-jax generate")
    return {"command": " ".join(["rlhf-jax", *argv[3:]]), **when,
            "reported": proc.stdout.strip().splitlines()[-1]}


def stage_files(tmp: str, rows: int) -> dict:
    """SFT demonstrations and RM preference pairs as .jsonl files of `rows` × 4 rows."""
    rng = np.random.default_rng(1)
    paths = {name: os.path.join(tmp, f"{name}.jsonl") for name in ("sft", "rm")}
    with open(paths["sft"], "w") as f:
        for _ in range(4 * rows):
            row = {"prompt": sentence(rng, 8), "completion": sentence(rng, 20)}
            f.write(json.dumps(row) + "\n")
    with open(paths["rm"], "w") as f:
        for _ in range(4 * rows):
            f.write(json.dumps({"prompt": sentence(rng, 8), "chosen": sentence(rng, 20),
                                "rejected": sentence(rng, 20)}) + "\n")
    return paths


def stage(args, name: str, tmp: str, data: str) -> dict:
    """The whole `rlhf-jax sft|rm` command for one step, without export."""
    overrides = [f"model.path={args.model_dir}", "data.synthetic=null", f"data.train={data}",
                 f"data.max_length={args.max_length}", f"batch_size={args.batch}", "steps=1",
                 "export=false", f"out_dir={os.path.join(tmp, name)}", *args.stage_args]
    argv = [sys.executable, "-m", "rlhf_jax.cli", name, *overrides]
    when, proc = timed(argv, f"rlhf-jax {name}")
    # The progress line of the only step: its seconds are the first step's (compile + run).
    step = re.search(r" 1/1 steps \(100%\), ([0-9.]+) s/step", proc.stderr)
    return {"command": " ".join(["rlhf-jax", name, *overrides]), **when,
            "first_step_s": float(step.group(1)) if step else None}


def measure(args, tmp: str) -> dict:
    """Runs the parts `args.parts` names; returns the shape's result row."""
    cfg = model_config(args.shape)
    row = {"shape": args.shape, "config": {k: (v.value if hasattr(v, "value") else v)
                                           for k, v in vars(cfg).items() if k != "rope_scaling"},
           "num_params": cfg.num_params, "batch": args.batch, "new_tokens": args.new_tokens}
    if "generate" in args.parts:
        # The steady calls compared are the on-worker's, alternating with calls without.
        calls = {p: generate_calls(args, p, interleave=p == "on") for p in ("off", "on")}
        steady = calls["on"]["steady_median_s"]
        extra = calls["on"]["first_call_s"] - calls["off"]["first_call_s"]
        gain = steady["off"] - steady["on"]
        row["generate"] = {**calls, "steady_interleaved_s": steady,
                           "panels_first_call_extra_s": extra, "panels_gain_per_call_s": gain,
                           "break_even_calls": extra / gain if gain > 0 else None}
    if "command" in args.parts:
        row["rlhf_jax_generate"] = command(args, tmp)
    if {"sft", "rm"} & set(args.parts):
        data = stage_files(tmp, args.batch)
        for name in ("sft", "rm"):
            if name in args.parts:
                row[f"rlhf_jax_{name}"] = {**stage(args, name, tmp, data[name]),
                                           "max_length": args.max_length}
    return row


def table(row: dict) -> str:
    lines = []
    if "generate" in row:
        g = row["generate"]
        cell = lambda key: " | ".join(f"{g[p][key]:.1f}" for p in ("off", "on"))  # noqa: E731
        steady = " | ".join(f"{g['steady_interleaved_s'][p]:.2f}" for p in ("off", "on"))
        even = g["break_even_calls"]
        lines += ["| generate, each in a fresh process | panels off | panels on |",
                  "|---|---|---|",
                  f"| `load_hf` + tokenizer s | {cell('load_s')} |",
                  f"| first call s (trace, compile, run) | {cell('first_call_s')} |",
                  f"| steady call s (median, alternating) | {steady} |",
                  f"| panels: first call {g['panels_first_call_extra_s']:+.1f} s, "
                  f"{-g['panels_gain_per_call_s']:+.2f} s a call | break-even: "
                  f"{'never' if even is None else f'{even:.0f} calls'} | |", ""]
    commands = [(name, row[f"rlhf_jax_{name}"]) for name in ("generate", "sft", "rm")
                if f"rlhf_jax_{name}" in row]
    if commands:
        lines += ["| whole command, fresh process, no compilation cache | s | first step s "
                  "(compile + run) | 1-min load |", "|---|---|---|---|"]
        label = {"generate": "rlhf-jax generate (one batch; panels as the rule picks)",
                 "sft": "rlhf-jax sft steps=1 export=false",
                 "rm": "rlhf-jax rm steps=1 export=false"}
        lines += [f"| `{label[name]}` | {r['seconds']:.1f} | "
                  f"{r['first_step_s'] if r.get('first_step_s') else ''} | "
                  f"{r['load_average'][0]} |" for name, r in commands]
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["qwen2-0.5b", "small", "base"], default="qwen2-0.5b")
    ap.add_argument("--model-dir", help="where the model is built (kept; default: a temporary "
                                        "directory)")
    ap.add_argument("--parts", default=",".join(PARTS),
                    help=f"comma-separated, of {', '.join(PARTS)} (default: all)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64, help="SFT / RM tokens per row")
    ap.add_argument("--steady", type=int, default=3, help="generate calls after the first")
    ap.add_argument("--stage-args", nargs="*", default=[],
                    help="more key=value overrides for the sft and rm commands")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/first_call_<device>.json)")
    ap.add_argument("--worker", choices=["build", "calls"], help=argparse.SUPPRESS)
    ap.add_argument("--panels", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--interleave", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "build":
        build(args.shape, args.model_dir)
        return 0
    if args.worker == "calls":
        worker(args)
        return 0
    args.parts = [p for p in args.parts.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        args.model_dir = os.path.abspath(args.model_dir or os.path.join(tmp, "model"))
        # Built in a process of its own: this one stays small while the others are timed.
        timed([sys.executable, __file__, "--worker", "build", "--shape", args.shape,
               "--model-dir", args.model_dir], f"building the {args.shape} model")
        row = measure(args, tmp)
    result = run_record("first_call")
    out = args.out or os.path.join(RESULTS, f"first_call_{result['device']}.json")
    # Parts not run this time are kept from the file (each part has its own date_utc).
    row = {**previous_row(out, args.shape), **row, "command": result["command"]}
    result["shapes"] = [row]
    write_results(out, result, [args.shape])
    print(table(row))
    print(f"\n{result['device']}, {args.shape}, batch {args.batch}, {args.new_tokens} new "
          f"tokens; wrote {out}")
    return 0


def previous_row(path: str, shape: str) -> dict:
    """The row of `shape` in an earlier result file: parts not run this time are kept."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return next((r for r in json.load(f).get("shapes", []) if r["shape"] == shape), {})


if __name__ == "__main__":
    sys.exit(main())
