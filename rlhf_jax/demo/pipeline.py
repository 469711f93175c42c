"""`rlhf-jax demo`: the RLHF pipeline on the built-in movie-review world, on a laptop CPU.

Stages (each with a progress bar; everything offline, from data generated here):
  1. a byte-level BPE tokenizer and a tiny base language model pretrained on the corpus;
  2. sampling from it, written to the report.
Later stages (SFT, preference collection, reward model, PPO, evaluation) plug in here.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from rlhf_jax import models, optim, sft
from rlhf_jax.demo import world
from rlhf_jax.tiny import tiny_config, train_tokenizer


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults finish in minutes on 2 CPU cores.

    Attributes:
      seed: seed of every random choice (data, init, sampling).
      vocab_size: BPE vocabulary size.
      hidden_size / num_layers: the tiny GPT-2-shaped model.
      pretrain_docs: corpus documents for pretraining.
      pretrain_steps: optimizer steps of pretraining.
      batch_size: sequences per step.
      seq_len: tokens per training sequence (longer documents are cut).
      learning_rate: peak learning rate of pretraining.
      num_samples: reviews sampled at the end.
      max_new_tokens: length limit of a sampled review.
    """

    seed: int = 0
    vocab_size: int = 384
    hidden_size: int = 64
    num_layers: int = 2
    pretrain_docs: int = 4000
    pretrain_steps: int = 300
    batch_size: int = 32
    seq_len: int = 48
    learning_rate: float = 3e-3
    num_samples: int = 8
    max_new_tokens: int = 40


def encode_documents(tokenizer, texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """Right-padded [N, seq_len] ids with BOS, attention and loss masks."""
    ids = np.full((len(texts), seq_len), tokenizer.pad_token_id, np.int32)
    for i, text in enumerate(texts):
        row = [tokenizer.bos_token_id] + tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        row = row[:seq_len]
        ids[i, : len(row)] = row
    mask = (ids != tokenizer.pad_token_id).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask}


def pretrain(cfg: DemoConfig, model, params, data: dict, rng: np.random.Generator):
    """Plain next-token training with the SFT step (loss on every real token)."""
    tx = optim.make_optimizer(
        optim.OptimizerConfig(learning_rate=cfg.learning_rate, schedule="cosine",
                              warmup_steps=cfg.pretrain_steps // 10, b2=0.99),
        cfg.pretrain_steps,
    )
    state = optim.create_state(params, tx)
    step = jax.jit(functools.partial(sft.train_step, model=model, tx=tx), donate_argnums=0)
    n = len(data["input_ids"])
    losses = []
    with tqdm(range(cfg.pretrain_steps), desc="1/2 pretrain base LM", unit="step") as bar:
        for _ in bar:
            idx = rng.integers(0, n, cfg.batch_size)
            state, metrics = step(state, {k: v[idx] for k, v in data.items()})
            loss = float(metrics["loss"])
            losses.append(loss)
            bar.set_postfix(loss=f"{loss:.3f}")
    return state.params, losses


def sample(model, params, tokenizer, prompts: list[str], max_new_tokens: int, seed: int):
    """Temperature-1 sampling with the KV cache (one jit-compiled step, a host loop)."""
    enc = [[tokenizer.bos_token_id] + tokenizer(p)["input_ids"] for p in prompts]
    width = max(map(len, enc))
    ids = np.full((len(enc), width), tokenizer.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, row in enumerate(enc):  # left padding
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    cache = models.init_cache(model.cfg, len(enc), width + max_new_tokens)
    step = jax.jit(lambda c, i, m: model.apply({"params": params}, i, m, cache=c))
    logits, cache = step(cache, jnp.asarray(ids), jnp.asarray(mask))
    key = jax.random.PRNGKey(seed)
    done = np.zeros(len(enc), bool)
    out = [[] for _ in enc]
    for t in tqdm(range(max_new_tokens), desc="2/2 sample", unit="tok"):
        token = np.asarray(jax.random.categorical(jax.random.fold_in(key, t), logits[:, -1]))
        for i in np.flatnonzero(~done):
            out[i].append(int(token[i]))
        done |= token == tokenizer.eos_token_id
        if done.all():
            break
        live = (~done).astype(np.int32)[:, None]
        logits, cache = step(cache, jnp.asarray(token[:, None].astype(np.int32)), jnp.asarray(live))
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]


def run(cfg: DemoConfig, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    start = time.time()
    docs = world.corpus(rng, cfg.pretrain_docs)
    tokenizer = train_tokenizer(docs, cfg.vocab_size, os.path.join(out_dir, "tokenizer"))
    model_cfg = tiny_config("gpt2", vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                            num_layers=cfg.num_layers, intermediate_size=4 * cfg.hidden_size,
                            max_position_embeddings=128)
    model, params = models.init_model(model_cfg, seed=cfg.seed)
    params, losses = pretrain(cfg, model, params, encode_documents(tokenizer, docs, cfg.seq_len), rng)
    models.save_hf(os.path.join(out_dir, "base_model"), model, params, tokenizer)
    prompts = world.prompts(rng, cfg.num_samples)
    responses = sample(model, params, tokenizer, prompts, cfg.max_new_tokens, cfg.seed)
    gold = [world.gold_reward(p, r) for p, r in zip(prompts, responses)]
    summary = {
        "pretrain_loss_first": losses[0],
        "pretrain_loss_last": float(np.mean(losses[-20:])),
        "gold_reward_mean": float(np.mean(gold)),
        "seconds": time.time() - start,
        "samples": [{"prompt": p, "response": r, "gold": g} for p, r, g in zip(prompts, responses, gold)],
    }
    _write_report(out_dir, summary)
    return summary


def _write_report(out_dir: str, summary: dict) -> None:
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = [
        "# rlhf_jax demo report", "",
        f"- pretraining loss: {summary['pretrain_loss_first']:.3f} → {summary['pretrain_loss_last']:.3f}",
        f"- gold reward of base-model samples: {summary['gold_reward_mean']:.3f}",
        f"- wall time: {summary['seconds']:.0f} s", "",
        "| prompt | response | gold |", "| --- | --- | --- |",
    ]
    lines += [f"| {s['prompt']} | {s['response'].strip()} | {s['gold']:.2f} |" for s in summary["samples"]]
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


CONFIG_CLASS = DemoConfig


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-jax demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--config", default=None, help="YAML file of DemoConfig fields")
    parser.add_argument("overrides", nargs="*", help="DemoConfig fields as key=value")
    args = parser.parse_args(argv)
    from rlhf_jax import config

    try:
        cfg = config.load(DemoConfig, args.config, args.overrides)
    except config.ConfigError as e:
        print(f"rlhf-jax demo: {e}")
        return 2
    summary = run(cfg, args.out)
    print(f"\nreport: {os.path.join(args.out, 'report.md')}  "
          f"(pretrain loss {summary['pretrain_loss_first']:.2f} → {summary['pretrain_loss_last']:.2f}, "
          f"{summary['seconds']:.0f} s)")
    for s in summary["samples"][:4]:
        print(f"  {s['prompt']}{s['response'].rstrip()}")
    return 0
