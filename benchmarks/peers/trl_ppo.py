"""Times TRL's PPO iteration (the peer of benchmarks/ppo.py); run with the peer venv's python.

    benchmarks/peers/.venv-trl/bin/python benchmarks/peers/trl_ppo.py \
        --policy DIR --reward DIR --tokenizer DIR --prompts prompts.json \
        --new-tokens 32 --iterations 4 --threads 2 > result.json 2> trl.log

`--policy` is a Hugging Face causal LM (also the reference: loaded twice), `--reward` a
sequence-classification model (the reward model, and the value model's starting point: loaded
twice, as TRL's examples do). `prompts.json` is a list of token-id lists; the whole list is
one batch, so every iteration sees the same (shuffled) prompts, left-padded to the longest.

`trl.PPOTrainer.train` runs `--iterations` PPO iterations in one call. Its phases are timed
from the outside without changing what it does:
  generate = the `batch_generation` call (sampling, KV cache, `output_scores` logits kept),
  score    = from its end to the first forward of the policy-and-value wrapper (reference,
             value and reward forwards, rewards, GAE, whitening; TRL takes the policy's
             log-probs from the sampling logits, so it runs no policy forward here),
  update   = from there to the trainer's `on_step_end` (ppo epochs × minibatches of
             forward + backward + AdamW step, then its metrics),
  iteration = from the end of the previous iteration (the first: `on_train_begin`) to
             `on_step_end` (includes fetching the prompts).
Iteration 0 is the warm-up (first-call costs) and is reported apart.

With `--lockstep` (how benchmarks/ppo.py runs it) the trainer pauses after each iteration:
it prints that iteration's times as one JSON line and waits for a line on stdin before the
next, so that the caller can run its own iteration in between (the two sides then see the
same machine load). The pause is not counted: an iteration starts when it resumes.

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

log = logger("trl_ppo")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists (one batch)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--iterations", type=int, default=4, help="PPO iterations, the first a warm-up")
    ap.add_argument("--ppo-epochs", type=int, default=4)
    ap.add_argument("--minibatches", type=int, default=1)
    ap.add_argument("--learning-rate", type=float, default=3e-6)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lockstep", action="store_true",
                    help="after each iteration print its times and wait for a line on stdin")
    args = ap.parse_args(argv)

    import datasets
    import torch
    import transformers
    import trl
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              PreTrainedTokenizerFast, TrainerCallback)
    from trl.trainer import ppo_trainer as ppo_mod

    torch.set_num_threads(args.threads)
    retain_freed_memory()  # the same glibc malloc settings as rlhf_jax's side
    torch.manual_seed(0)
    with open(args.prompts) as f:
        prompts = json.load(f)
    batch = len(prompts)

    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(args.tokenizer, "tokenizer.json"),
                                  pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")
    tok.padding_side = "left"
    t_load = time.perf_counter()
    kw = dict(dtype=torch.float32, local_files_only=True)
    policy = AutoModelForCausalLM.from_pretrained(args.policy, **kw)
    ref = AutoModelForCausalLM.from_pretrained(args.policy, **kw)
    reward = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **kw)
    value = AutoModelForSequenceClassification.from_pretrained(args.reward, num_labels=1, **kw)
    for m in (policy, ref, reward, value):
        m.config.pad_token_id = tok.pad_token_id
    load_s = time.perf_counter() - t_load

    marks: list[tuple[str, float]] = []  # (event, perf_counter)
    original_generation = ppo_mod.batch_generation

    generated: list[int] = []  # new tokens per row of each generation (32: no early stop)

    def timed_generation(model, queries, *a, **k):
        marks.append(("generate_begin", time.perf_counter()))
        out = original_generation(model, queries, *a, **k)
        marks.append(("generate_end", time.perf_counter()))
        generated.append(int(out[0].shape[1] - queries.shape[1]))
        return out

    ppo_mod.batch_generation = timed_generation
    wrapper_forward = ppo_mod.PolicyAndValueWrapper.forward

    def timed_forward(self, **k):
        if marks and marks[-1][0] == "generate_end":  # the first update forward of the iteration
            marks.append(("update_begin", time.perf_counter()))
        return wrapper_forward(self, **k)

    ppo_mod.PolicyAndValueWrapper.forward = timed_forward

    class Marks(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(("train_begin", time.perf_counter()))

        def on_step_end(self, *a, **k):
            marks.append(("step_end", time.perf_counter()))
            if args.lockstep:
                print("LOCKSTEP " + json.dumps(iterations()[-1]), flush=True)
                sys.stdin.readline()
            marks.append(("resume", time.perf_counter()))

    def iterations() -> list[dict]:
        """Marks → per-iteration phase times."""
        iters, cur, start = [], {}, None
        for name, t in marks:
            if name in ("train_begin", "resume"):
                start = t
            elif name == "generate_begin":
                cur = {"start": start, "generate_begin": t}
            else:
                cur[name] = t
                if name == "step_end":
                    iters.append({
                        "generate": cur["generate_end"] - cur["generate_begin"],
                        "score": cur["update_begin"] - cur["generate_end"],
                        "update": t - cur["update_begin"],
                        "iteration": t - cur["start"],
                    })
        return iters

    dataset = datasets.Dataset.from_dict({"input_ids": prompts})
    with tempfile.TemporaryDirectory() as out_dir:
        config = trl.PPOConfig(
            output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=10**6,
            disable_tqdm=True, use_cpu=True, bf16=False, fp16=False, seed=0,
            per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            num_mini_batches=args.minibatches, num_ppo_epochs=args.ppo_epochs,
            local_rollout_forward_batch_size=batch, total_episodes=batch * args.iterations,
            response_length=args.new_tokens, stop_token=None, stop_token_id=None,
            temperature=1.0, kl_estimator="k1", kl_coef=0.05, missing_eos_penalty=None,
            num_sample_generations=0, learning_rate=args.learning_rate,
            dataloader_num_workers=0,
        )
        t_init = time.perf_counter()
        trainer = trl.PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref,
                                 reward_model=reward, value_model=value, train_dataset=dataset,
                                 eval_dataset=dataset, callbacks=[Marks()])
        init_s = time.perf_counter() - t_init
        log(f"training {args.iterations} iterations of batch {batch}")
        freeze_live_objects()  # set-up done, as on rlhf_jax's side
        t_train = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t_train

    iters = iterations()
    assert len(iters) == args.iterations, (len(iters), marks)
    assert all(n == args.new_tokens for n in generated), generated
    print("RESULT " + json.dumps({
        "peer": "trl",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "accelerate": __import__("accelerate").__version__,
                     "python": sys.version.split()[0]},
        "torch_threads": torch.get_num_threads(),
        "batch": batch,
        "prompt_width": max(len(p) for p in prompts),
        "new_tokens": args.new_tokens,
        "new_tokens_generated": generated,
        "ppo_epochs": args.ppo_epochs,
        "minibatches": args.minibatches,
        "load_s": load_s,
        "init_s": init_s,
        "train_s_with_pauses": train_s,
        "first": iters[0],
        "steady": iters[1:],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
