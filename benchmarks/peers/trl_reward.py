"""Times TRL's `RewardTrainer` step (the peer of benchmarks/reward.py); run with the peer venv's
python.

    benchmarks/peers/.venv-trl/bin/python benchmarks/peers/trl_reward.py \
        --model DIR --tokenizer DIR --pairs pairs.json --batch 16 --steps 4 --threads 2 \
        > result.json 2> trl.log

`--model` is a Hugging Face sequence-classification model; `pairs.json` a list of
{"chosen_input_ids": [...], "rejected_input_ids": [...]} (pre-tokenized, so TRL does no
tokenization; all of one length, so nothing is padded). `RewardTrainer.train` runs `--steps`
optimizer steps of `--batch` pairs: one forward over the 2·batch sequences, the Bradley–Terry
loss, backward, gradient clipping at 1.0 and AdamW. A step is timed from the trainer's
`on_step_begin` to its `on_step_end` (the batch is already collated), and also between
the end of the previous step (with data loading). Step 0 is the warm-up, reported apart.
With `--lockstep` the trainer pauses after each step: it prints the step's time as one line
"LOCKSTEP {json}" and waits for a line on stdin (the caller runs its own step meanwhile).
Gradient checkpointing (on by default in TRL's `RewardConfig`) is turned off, as rlhf_jax's
is by default.

Prints its result as one line "RESULT {json}" on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

from peer_common import freeze_live_objects, logger, retain_freed_memory

log = logger("trl_reward")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--pairs", required=True, help="JSON list of pre-tokenized pairs")
    ap.add_argument("--batch", type=int, default=16, help="pairs per optimizer step")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps, the first a warm-up")
    ap.add_argument("--learning-rate", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lockstep", action="store_true",
                    help="after each step print its time and wait for a line on stdin")
    args = ap.parse_args(argv)

    import datasets
    import torch
    import transformers
    import trl
    from transformers import (AutoModelForSequenceClassification, PreTrainedTokenizerFast,
                              TrainerCallback)

    torch.set_num_threads(args.threads)
    retain_freed_memory()  # the same glibc malloc settings as rlhf_jax's side
    torch.manual_seed(0)
    with open(args.pairs) as f:
        pairs = json.load(f)
    assert len(pairs) >= args.batch * args.steps, (len(pairs), args.batch, args.steps)
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.tokenizer, "tokenizer.json"),
                                  pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=1, dtype=torch.float32, local_files_only=True)
    model.config.pad_token_id = tok.pad_token_id

    marks: list[tuple[str, float]] = []

    class Marks(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(("train_begin", time.perf_counter()))

        def on_step_begin(self, *a, **k):
            marks.append(("step_begin", time.perf_counter()))

        def on_step_end(self, *a, **k):
            marks.append(("step_end", time.perf_counter()))
            if args.lockstep:
                begin = [t for name, t in marks if name == "step_begin"][-1]
                print("LOCKSTEP " + json.dumps({"step": marks[-1][1] - begin}), flush=True)
                sys.stdin.readline()
            marks.append(("resume", time.perf_counter()))

    dataset = datasets.Dataset.from_list(pairs[:args.batch * args.steps])
    with tempfile.TemporaryDirectory() as out_dir:
        config = trl.RewardConfig(
            output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=10**6,
            disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=0,
            per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=args.learning_rate, max_grad_norm=1.0,
            gradient_checkpointing=False, max_length=None, dataloader_num_workers=0,
        )
        t_init = time.perf_counter()
        trainer = trl.RewardTrainer(model=model, args=config, train_dataset=dataset,
                                    processing_class=tok, callbacks=[Marks()])
        init_s = time.perf_counter() - t_init
        log(f"training {args.steps} steps of {args.batch} pairs")
        freeze_live_objects()  # set-up done, as on rlhf_jax's side
        t_train = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t_train

    steps, intervals, begin, prev_end = [], [], None, None
    for name, t in marks:
        if name in ("train_begin", "resume"):
            prev_end = t
        elif name == "step_begin":
            begin = t
        elif name == "step_end":
            steps.append(t - begin)
            intervals.append(t - prev_end)
    assert len(steps) == args.steps, marks
    print("RESULT " + json.dumps({
        "peer": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "accelerate": __import__("accelerate").__version__,
                     "python": sys.version.split()[0]},
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "sequence_length": len(pairs[0]["chosen_input_ids"]),
        "init_s": init_s,
        "train_s_with_pauses": train_s,
        "first": {"step": steps[0], "interval": intervals[0]},
        "steady": [{"step": s, "interval": i} for s, i in zip(steps[1:], intervals[1:])],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
