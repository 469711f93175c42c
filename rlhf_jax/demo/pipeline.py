"""`rlhf-jax demo`: the whole RLHF pipeline on the built-in movie-review world, on a laptop CPU.

Everything is offline, made here from `world.py`:
  1. a byte-level BPE tokenizer and a tiny GPT-2-shaped base model pretrained on the corpus;
  2. SFT on demonstrations (loss on the completion only);
  3. preference collection: the SFT model writes two reviews per prompt and the hidden gold
     judge labels each pair with Bradley-Terry noise, like people would; written to
     data/preferences.jsonl in the explicit prompt/chosen/rejected format;
  4. reward model training (`rlhf_jax.stages.rm`) from the SFT model, with held-out accuracy;
  5. PPO (`rlhf_jax.stages.ppo`) against the learned reward model;
  6. evaluation on held-out prompts: gold and RM rewards of the SFT and PPO policies, KL of
     PPO to the SFT reference, PPO's win rate over SFT judged by gold, samples before/after.
The report (report.md, plots/*.png, summary.json) goes to the output directory; the models
go to models/{base,sft,reward,ppo} in Hugging Face format, so `configs/ppo_tiny.yaml` and
`rlhf-jax generate` can use them afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from typing import Callable, Optional

import jax
import numpy as np

from rlhf_jax import models
from rlhf_jax.config import ConfigError, check
from rlhf_jax.data.prompts import PromptDataConfig
from rlhf_jax.demo.report import summary_lines, write_report
from rlhf_jax.models.sampling import SamplingConfig, make_generate_fn, pad_prompts
from rlhf_jax.rl import ppo as ppo_math
from rlhf_jax.stages import ppo, rm, sft
from rlhf_jax.train import optim
from rlhf_jax.train.checkpoint import CheckpointConfig
from rlhf_jax.train.model_source import ModelConfig
from rlhf_jax.train.optim import OptimizerConfig
from rlhf_jax.train.logging import read_jsonl
from rlhf_jax.train.progress import progress
from rlhf_jax.world import movies
from rlhf_jax.world.tiny import tiny_config, train_tokenizer


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults finish in minutes on 2 CPU cores.

    Attributes:
      seed: seed of every random choice (data, init, sampling, labels).
      vocab_size: BPE vocabulary size.
      hidden_size: width of the tiny GPT-2-shaped models.
      num_layers: their depth.
      batch_size: sequences per pretraining / SFT step.
      seq_len: tokens per pretraining / SFT sequence (longer ones are cut).
      pretrain_docs: corpus documents for pretraining.
      pretrain_steps: optimizer steps of pretraining.
      learning_rate: peak learning rate of pretraining and SFT.
      sft_examples: demonstrations for SFT.
      sft_steps: optimizer steps of SFT.
      preference_prompts: prompts the SFT model answers twice for preference labels.
      label_temperature: noise of the gold labellers: P(a ≻ b) = σ((g(a) − g(b)) / T).
      rm_epochs: passes of reward-model training over the pairs.
      rm_learning_rate: its peak learning rate.
      ppo_iterations: PPO iterations.
      ppo_batch_size: prompts per PPO iteration.
      ppo_learning_rate: learning rate of policy and critic.
      kl_coef: β of the KL penalty to the SFT reference (adaptive toward target_kl).
      target_kl: KL per response the adaptive controller aims at.
      max_new_tokens: longest response.
      eval_prompts: held-out prompts of the final evaluation.
      num_samples: sample rows shown in the report.
    """

    seed: int = 0
    vocab_size: int = 384
    hidden_size: int = 64
    num_layers: int = 2
    batch_size: int = 32
    seq_len: int = 48
    pretrain_docs: int = 4000
    pretrain_steps: int = 300
    learning_rate: float = 3e-3
    sft_examples: int = 2000
    sft_steps: int = 100
    preference_prompts: int = 1024
    label_temperature: float = 0.5
    rm_epochs: int = 2
    rm_learning_rate: float = 1e-3
    ppo_iterations: int = 40
    ppo_batch_size: int = 32
    ppo_learning_rate: float = 5e-4
    kl_coef: float = 0.05
    target_kl: float = 4.0
    max_new_tokens: int = 32
    eval_prompts: int = 128
    num_samples: int = 8

    def __post_init__(self):
        for name in ("pretrain_steps", "sft_steps", "rm_epochs", "ppo_iterations", "batch_size",
                     "ppo_batch_size", "max_new_tokens", "eval_prompts", "num_samples"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "1 or more")
        check(self.preference_prompts >= 20, "preference_prompts", self.preference_prompts,
              "20 or more (a tenth is held out to measure the reward model)")
        check(self.ppo_batch_size % 2 == 0, "ppo_batch_size", self.ppo_batch_size,
              "an even number (two PPO minibatches)")
        check(self.label_temperature > 0, "label_temperature", self.label_temperature,
              "a positive number")


CONFIG_CLASS = DemoConfig
PROMPT_WIDTH = 16  # prompt bucket: every demo prompt is shorter


# ----------------------------------------------------------------------------- language modelling


def encode_documents(tokenizer, texts: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """Pretraining rows: right-padded [N, seq_len] `[BOS] text [EOS]`, loss on every token."""
    rows = [[tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
            for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    ids, mask = _right_pad(rows, tokenizer.pad_token_id, seq_len, width=seq_len)
    loss = mask.copy()
    loss[:, 0] = 0  # BOS is never a target
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss}


def pretrain(model, params, data: dict, steps: int, lr: float, batch_size: int,
             rng: np.random.Generator, desc: str) -> tuple[dict, list[float]]:
    """`steps` of the SFT step on batches drawn at random (with replacement) from `data`;
    (params, loss per step). A corpus held in memory needs none of the trainer's files."""
    tx = optim.make_optimizer(OptimizerConfig(learning_rate=lr, schedule="cosine",
                                              warmup_steps=steps // 10, b2=0.99), steps)
    state = optim.create_state(params, tx)
    step = jax.jit(functools.partial(sft.train_step, model=model, tx=tx), donate_argnums=0)
    n, losses = len(data["input_ids"]), []
    with progress(steps, desc=desc) as bar:
        for _ in range(steps):
            idx = rng.integers(0, n, batch_size)
            state, metrics = step(state, {k: v[idx] for k, v in data.items()})
            losses.append(float(metrics["loss"]))
            bar.update(1)
            bar.set_postfix({"loss": losses[-1]})
    return jax.device_get(state.params), losses


# ----------------------------------------------------------------------------- sampling


class Sampler:
    """Temperature-1 sampling of reviews with the rollout engine (compiled once per model)."""

    def __init__(self, model, tokenizer, max_new_tokens: int, batch_size: int = 64):
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.fn = make_generate_fn(model, SamplingConfig(max_new_tokens=max_new_tokens,
                                                         prompt_bucket=PROMPT_WIDTH),
                                   eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """`[BOS] prompt` token lists, the layout the PPO prompts use."""
        tok = self.tokenizer
        return [[tok.bos_token_id] + ids
                for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]

    def __call__(self, params, rows: list[list[int]], seed: int) -> list[str]:
        """One response per encoded prompt in `rows`."""
        tok = self.tokenizer
        out: list[str] = []
        for n, lo in enumerate(range(0, len(rows), self.batch_size)):
            chunk = rows[lo:lo + self.batch_size]
            ids, mask = pad_prompts(chunk, PROMPT_WIDTH, tok.pad_token_id, self.batch_size)
            ro = jax.device_get(self.fn(params, ids, mask, jax.random.key(seed * 7919 + n)))
            out += [tok.decode(ro.tokens[i, :ro.lengths[i]], skip_special_tokens=True)
                    for i in range(len(chunk))]
        return out


class RewardScorer:
    """RM scores of (prompt, response) texts, laid out `[BOS] prompt response [EOS]` as the
    preference data are, cut at `limit` tokens."""

    def __init__(self, model_dir: str, tokenizer, limit: int):
        self.tokenizer, self.limit = tokenizer, limit
        model, self.params = models.load_hf(model_dir)
        self.fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))

    def __call__(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        tok = self.tokenizer
        heads = tok(list(prompts), add_special_tokens=False)["input_ids"]
        tails = tok(list(responses), add_special_tokens=False)["input_ids"]
        rows = [[tok.bos_token_id] + h + t + [tok.eos_token_id] for h, t in zip(heads, tails)]
        ids, mask = _right_pad(rows, tok.pad_token_id, self.limit)
        return np.asarray(self.fn(self.params, ids, mask))


# ----------------------------------------------------------------------------- measurements


def collect_preferences(sampler: Sampler, params, prompts: list[str], cfg: DemoConfig,
                        rng: np.random.Generator, path: str) -> dict:
    """Two SFT responses per prompt, labelled by the noisy gold judge; written as jsonl.

    Pairs of identical responses are skipped (nothing to compare). Returns counts and how
    often the noisy label agrees with the gold judge's own ordering.
    """
    rows_in = sampler.encode(prompts)
    a = sampler(params, rows_in, seed=cfg.seed + 1)
    b = sampler(params, rows_in, seed=cfg.seed + 2)
    rows, agree, strict = [], 0, 0
    with progress(len(prompts), desc="3/6 label preferences", unit="pair") as bar:
        for p, x, y in zip(prompts, a, b):
            bar.update(1)
            if x.strip() == y.strip() or not x.strip() or not y.strip():
                continue
            first, _ = movies.gold_preference(rng, p, x, y, cfg.label_temperature)
            chosen, rejected = (x, y) if first else (y, x)
            diff = movies.gold_reward(p, chosen) - movies.gold_reward(p, rejected)
            if diff != 0:
                strict += 1
                agree += diff > 0
            rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return {"pairs": len(rows), "label_agreement_with_gold": agree / max(strict, 1)}


def rm_accuracy_against_gold(scorer: RewardScorer, pairs: list[dict]) -> dict:
    """The trained RM's accuracy on held-out pairs against the gold judge's ordering (ties
    left out) and against the noisy labels."""
    prompts = [r["prompt"] for r in pairs]
    sc = scorer(prompts, [r["chosen"] for r in pairs])
    sr = scorer(prompts, [r["rejected"] for r in pairs])
    gold = np.array([movies.gold_reward(r["prompt"], r["chosen"])
                     - movies.gold_reward(r["prompt"], r["rejected"]) for r in pairs])
    strict = gold != 0
    right = (sc > sr)[strict] == (gold > 0)[strict]
    return {"accuracy_vs_labels": float(np.mean(sc > sr)),
            # undefined (None) when the judge ties every held-out pair
            "accuracy_vs_gold": float(np.mean(right)) if strict.any() else None,
            "held_out_pairs": int(len(pairs)), "gold_ties_left_out": int((~strict).sum())}


def compare_policies(sampler: Sampler, sft_params, ppo_params, prompts: list[str], seed: int,
             rm_scorer: Callable) -> dict:
    """Gold and RM rewards of both policies on the same prompts, and PPO's gold win rate."""
    rows = sampler.encode(prompts)
    before = sampler(sft_params, rows, seed)
    after = sampler(ppo_params, rows, seed)
    g0 = np.array([movies.gold_reward(p, r) for p, r in zip(prompts, before)])
    g1 = np.array([movies.gold_reward(p, r) for p, r in zip(prompts, after)])
    wins = np.mean((g1 > g0) + 0.5 * (g1 == g0))
    return {
        "sft_gold_mean": float(g0.mean()), "sft_gold_std": float(g0.std()),
        "ppo_gold_mean": float(g1.mean()), "ppo_gold_std": float(g1.std()),
        "sft_rm_mean": float(np.mean(rm_scorer(prompts, before))),
        "ppo_rm_mean": float(np.mean(rm_scorer(prompts, after))),
        "ppo_win_rate_vs_sft": float(wins),
        "samples": [{"prompt": p, "sft": b, "sft_gold": float(x), "ppo": a, "ppo_gold": float(y)}
                    for p, b, x, a, y in zip(prompts, before, g0, after, g1)],
    }


# ----------------------------------------------------------------------------- the pipeline


class Pipeline:
    """The demo's six stages over one output directory; each stage keeps what the later ones
    need (models, prompts, scorers) and its wall time in `times`."""

    def __init__(self, cfg: DemoConfig, out_dir: str, log: Callable[[str], None]):
        self.cfg, self.out_dir, self.log = cfg, out_dir, log
        self.rng = np.random.default_rng(cfg.seed)
        self.dirs = {k: os.path.join(out_dir, "models", k) for k in ("base", "sft", "reward",
                                                                       "ppo")}
        self.data_dir = os.path.join(out_dir, "data")
        os.makedirs(self.data_dir, exist_ok=True)
        self.times: dict[str, float] = {}
        self.summary: dict = {}

    def timed(self, name: str, stage: Callable[[], None]) -> None:
        start = time.time()
        stage()
        self.times[name] = time.time() - start

    def pretrain(self) -> None:
        """1. A byte-level BPE and a tiny GPT-2-shaped base model pretrained on the corpus."""
        cfg = self.cfg
        docs = movies.corpus(self.rng, cfg.pretrain_docs)
        self.tokenizer = train_tokenizer(docs, cfg.vocab_size,
                                         os.path.join(self.out_dir, "tokenizer"))
        vocab = -(-len(self.tokenizer) // 64) * 64
        model_cfg = tiny_config("gpt2", vocab_size=vocab, hidden_size=cfg.hidden_size,
                                num_layers=cfg.num_layers, intermediate_size=4 * cfg.hidden_size,
                                max_position_embeddings=128)
        self.model, params = models.init_model(model_cfg, seed=cfg.seed)
        params, losses = pretrain(self.model, params,
                                  encode_documents(self.tokenizer, docs, cfg.seq_len),
                                  cfg.pretrain_steps, cfg.learning_rate, cfg.batch_size, self.rng,
                                  "1/6 pretrain base LM")
        models.save_hf(self.dirs["base"], self.model, params, self.tokenizer)
        self.summary.update(pretrain_loss_first=losses[0],
                            pretrain_loss_last=float(np.mean(losses[-20:])))

    def sft(self) -> None:
        """2. SFT through the sft trainer, on demonstrations written as a user's jsonl would be."""
        cfg = self.cfg
        demos_path = os.path.join(self.data_dir, "demonstrations.jsonl")
        with open(demos_path, "w", encoding="utf-8") as f:
            for d in movies.demonstrations(self.rng, cfg.sft_examples):
                f.write(json.dumps(d) + "\n")
        sft_cfg = sft.SFTConfig(
            out_dir=os.path.join(self.out_dir, "runs", "sft"), seed=cfg.seed,
            model=ModelConfig(path=self.dirs["base"]),
            data=sft.SFTStageDataConfig(train=demos_path, max_length=cfg.seq_len),
            optim=OptimizerConfig(learning_rate=cfg.learning_rate / 3, schedule="cosine",
                                  warmup_steps=cfg.sft_steps // 10, b2=0.99),
            batch_size=cfg.batch_size, steps=cfg.sft_steps, log_every=1,
            checkpoint=CheckpointConfig(every=0, resume=False),
        )
        result = sft.train(sft_cfg, log=self.log, progress_desc="2/6 SFT on demonstrations")
        _move(result["export"], self.dirs["sft"])
        _, self.sft_params = models.load_hf(self.dirs["sft"])
        losses = [r["train/loss"] for r in read_jsonl(os.path.join(sft_cfg.out_dir,
                                                                   "metrics.jsonl"))
                  if "train/loss" in r]
        self.summary.update(sft_loss_first=losses[0], sft_loss_last=float(np.mean(losses[-10:])))

    def preferences(self) -> None:
        """3. Preferences labelled by the noisy gold judge (and the prompt sets of PPO and
        evaluation)."""
        cfg = self.cfg
        self.sampler = Sampler(self.model, self.tokenizer, cfg.max_new_tokens)
        pref_prompts = movies.prompts(self.rng, cfg.preference_prompts)
        self.summary["preferences"] = collect_preferences(
            self.sampler, self.sft_params, pref_prompts, cfg, self.rng,
            os.path.join(self.data_dir, "preferences.jsonl"))
        with open(os.path.join(self.data_dir, "prompts.jsonl"), "w", encoding="utf-8") as f:
            for p in movies.prompts(self.rng, 512):
                f.write(json.dumps({"prompt": p}) + "\n")
        self.eval_prompts = movies.prompts(np.random.default_rng(cfg.seed + 99), cfg.eval_prompts)

    def reward_model(self) -> None:
        """4. The reward model, from the SFT model, through the rm trainer."""
        cfg = self.cfg
        rm_cfg = rm.RMConfig(
            out_dir=os.path.join(self.out_dir, "runs", "rm"), seed=cfg.seed,
            model=ModelConfig(path=self.dirs["sft"]),
            data=rm.RMDataConfig(train=os.path.join(self.data_dir, "preferences.jsonl"),
                                 eval_fraction=0.1, max_length=cfg.seq_len + PROMPT_WIDTH,
                                 on_bad_row="drop"),
            optim=OptimizerConfig(learning_rate=cfg.rm_learning_rate, schedule="cosine",
                                  warmup_steps=10),
            batch_size=32, epochs=cfg.rm_epochs, log_every=5, normalise_after_training=True,
            checkpoint=CheckpointConfig(every=0, resume=False),
        )
        result = rm.train(rm_cfg, log=self.log, progress_desc="4/6 reward model")
        _move(result["export"], self.dirs["reward"])
        held = _held_out_pairs(rm_cfg, self.data_dir)
        self.rm_scorer = RewardScorer(self.dirs["reward"], self.tokenizer, rm_cfg.data.max_length)
        rm_eval = rm_accuracy_against_gold(self.rm_scorer, held)
        rm_eval["accuracy_trainer_eval"] = result["eval"].get("accuracy")
        self.summary["reward_model"] = rm_eval

    def ppo(self) -> None:
        """5. PPO through the ppo trainer, with the gold judge watching each batch."""
        cfg = self.cfg
        ppo_cfg = ppo.PPORunConfig(
            out_dir=os.path.join(self.out_dir, "runs", "ppo"), seed=cfg.seed,
            policy=self.dirs["sft"], reward_model=self.dirs["reward"],
            prompts=PromptDataConfig(train=os.path.join(self.data_dir, "prompts.jsonl"),
                                     eval_fraction=0.1, max_prompt_length=PROMPT_WIDTH),
            sampling=SamplingConfig(max_new_tokens=cfg.max_new_tokens,
                                    prompt_bucket=PROMPT_WIDTH),
            ppo=ppo_math.PPOConfig(ppo_epochs=4, num_minibatches=2, kl_coef=cfg.kl_coef,
                                   kl_control="adaptive", target_kl=cfg.target_kl,
                                   kl_horizon=2000, vf_coef=0.5, missing_eos_penalty=1.0),
            optim=OptimizerConfig(learning_rate=cfg.ppo_learning_rate),
            batch_size=cfg.ppo_batch_size, iterations=cfg.ppo_iterations, sample_every=0,
            checkpoint=CheckpointConfig(every=0, resume=False), export=True,
        )

        def gold_of_batch(_, prompts, responses):
            return {"env/gold": float(np.mean([movies.gold_reward(p, r)
                                               for p, r in zip(prompts, responses)]))}

        result = ppo.train(ppo_cfg, log=self.log, progress_desc="5/6 PPO",
                           on_iteration=gold_of_batch)
        _move(result["export"], self.dirs["ppo"])
        self.summary.update(ppo_last_kl=result["last"]["env/kl"],
                            ppo_last_rm_score=result["last"]["env/score"],
                            ppo_held_out_kl=result["eval"]["kl"])

    def evaluate(self) -> None:
        """6. Gold and RM rewards of the SFT and PPO policies on held-out prompts."""
        _, ppo_params = models.load_hf(self.dirs["ppo"])
        with progress(1, desc="6/6 evaluate", unit="run") as bar:
            self.comparison = compare_policies(self.sampler, self.sft_params, ppo_params,
                                               self.eval_prompts, self.cfg.seed + 7,
                                               self.rm_scorer)
            bar.update(1)


def run_pipeline(cfg: DemoConfig, out_dir: str, log: Callable[[str], None]) -> dict:
    """Runs the six stages into `out_dir`; returns the summary the report is written from."""
    start = time.time()
    demo = Pipeline(cfg, out_dir, log)
    for name, stage in (("pretrain", demo.pretrain), ("sft", demo.sft),
                        ("preferences", demo.preferences), ("reward_model", demo.reward_model),
                        ("ppo", demo.ppo), ("evaluate", demo.evaluate)):
        demo.timed(name, stage)
    ev = demo.comparison
    summary = {**demo.summary, **{k: v for k, v in ev.items() if k != "samples"},
               "stage_seconds": demo.times, "seconds": time.time() - start,
               "samples": ev["samples"][:cfg.num_samples]}
    write_report(out_dir, summary)
    return summary


def _move(src: str, dst: str) -> None:
    """Moves a trainer's export to the demo's models/ folder (replacing an older one)."""
    import shutil

    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(src, dst)


def _right_pad(rows: list[list[int]], pad: int, limit: int,
               width: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows cut at `limit` tokens, right-padded to `width` (default: the longest row)."""
    rows = [r[:limit] for r in rows]
    width = width or max(map(len, rows))
    ids = np.full((len(rows), width), pad, np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def _held_out_pairs(rm_cfg, data_dir: str) -> list[dict]:
    """The pairs the reward-model trainer held out (the same seeded split it used)."""
    from rlhf_jax.data import sources

    ds = sources.load_rows(os.path.join(data_dir, "preferences.jsonl"))
    _, held = sources.hold_out(ds, rm_cfg.data.eval_fraction, rm_cfg.seed)
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in held]


# ----------------------------------------------------------------------------- command line


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
    except ConfigError as e:
        print(f"rlhf-jax demo: {e}")
        return 2
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "demo.log")
    with open(log_path, "w", encoding="utf-8") as log_file:
        def quiet_log(message: str) -> None:  # the trainers' messages go to demo.log
            log_file.write(message + "\n")
            log_file.flush()

        s = run_pipeline(cfg, args.out, quiet_log)
    print(f"\nreport: {os.path.join(args.out, 'report.md')}  ({s['seconds']:.0f} s; trainer "
          f"logs in {log_path})")
    print("\n".join(summary_lines(s)))
    return 0
