"""Supervised fine-tuning (and plain language-model pretraining): the step and the loop.

The loss is the mean negative log-likelihood of the tokens where `loss_mask` is 1 (the
completion; every token for pretraining), predicted from the tokens before them:

    L = − Σ_{b,t} m[b,t+1] · log p(x[b,t+1] | x[b,≤t]) / Σ m[b,t+1]

With packed rows (`segment_ids`), m[b,t+1] also needs t and t+1 in the same example, so no
token is predicted from the example before it.

    rlhf-jax sft --config configs/sft_tiny.yaml steps=200 out_dir=runs/sft
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import perf
from rlhf_jax import sharding as shd
from rlhf_jax.data.sft import SFTDataConfig, load_sft
from rlhf_jax.train import optim
from rlhf_jax.train.loop import command, run
from rlhf_jax.train.supervised import (
    GeneratedData, SupervisedConfig, SupervisedJob, SupervisedStage,
)
from rlhf_jax.world import movies

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class SFTStageDataConfig(GeneratedData, SFTDataConfig):
    """The demonstrations (the fields of `rlhf_jax.data.sft.SFTDataConfig`), or generated ones.

    Attributes:
      synthetic: generate demonstrations and their tokenizer from the built-in movie-review
        world (`rlhf_jax.world.movies`) instead of reading `train`/`eval`.
    """

    synthetic: Optional[movies.DemonstrationsConfig] = None


@dataclasses.dataclass(frozen=True)
class SFTConfig(SupervisedConfig):
    """A supervised fine-tuning (or pretraining) run: the fields of
    `rlhf_jax.train.supervised.SupervisedConfig` (batch_size counts rows; a packed row holds
    several examples) and

    Attributes:
      data: demonstrations (see SFTStageDataConfig).
    """

    out_dir: str = "runs/sft"
    data: SFTStageDataConfig = SFTStageDataConfig(synthetic=movies.DemonstrationsConfig())


CONFIG_CLASS = SFTConfig

# ----------------------------------------------------------------------------- step


def token_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array):
    """Sum and count of next-token NLL over masked targets.

    Args:
      logits: [B, T, V] float32.
      input_ids: [B, T].
      loss_mask: [B, T], 1 where the token is a target (its prediction comes from t − 1).

    Returns:
      (nll_sum, token_count, correct_sum) scalars.
    """
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, T-1, V]
    targets = input_ids[:, 1:]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    correct = (jnp.argmax(logp, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(correct * mask)


def same_segment_as_previous(segment_ids: jax.Array) -> jax.Array:
    """[B, T] int32: 1 where token t is in the same (real) example as token t − 1."""
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    return jnp.pad(same, ((0, 0), (1, 0))).astype(jnp.int32)


def loss_fn(params: Any, batch: dict, model) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """(nll_sum, (count, metric sums)) for `optim.accumulate_gradients`.

    `batch` holds input_ids, attention_mask and loss_mask [B, T], and segment_ids [B, T]
    when rows are packed.
    """
    loss_mask = batch["loss_mask"]
    packed = {}
    if "segment_ids" in batch:
        packed = {"segment_ids": batch["segment_ids"]}
        loss_mask = loss_mask * same_segment_as_previous(batch["segment_ids"])
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"], **packed)
    nll, count, correct = token_nll(logits, batch["input_ids"], loss_mask)
    return nll, (count, {"loss": nll, "accuracy": correct})


def train_step(
    state: optim.TrainState,
    batch: dict,
    *,
    model,
    tx: optax.GradientTransformation,
    grad_accum: int = 1,
) -> tuple[optim.TrainState, dict]:
    """One SFT update on `batch` = {input_ids, attention_mask, loss_mask[, segment_ids]}.

    Close over `model`, `tx` and `grad_accum` with `functools.partial`, then jit with
    `donate_argnums=0`. A non-finite update keeps the old params (the step still counts);
    `finite` in the metrics says so.

    Returns:
      (new state, metrics): loss and accuracy (means over target tokens), grad_norm,
      update_norm, tokens (target count) and finite.
    """
    new_state, metrics, count = optim.gradient_step(
        state, functools.partial(loss_fn, model=model), batch, tx, grad_accum)
    return new_state, {**metrics, "tokens": count}


def eval_step(params: Any, batch: dict, *, model) -> dict:
    """Metric sums over one batch (divide by `tokens` after adding up all batches)."""
    _, (count, sums) = loss_fn(params, batch, model)
    return {**sums, "tokens": count}


# ----------------------------------------------------------------------------- the stage


def _steps(cfg: SFTConfig, model, tx) -> tuple[Callable, Callable]:
    return (functools.partial(train_step, model=model, tx=tx, grad_accum=cfg.grad_accum),
            functools.partial(eval_step, model=model))


def _batch_shardings(cfg: SFTConfig, mesh) -> dict:
    keys = ("input_ids", "attention_mask", "loss_mask") + (
        ("segment_ids",) if cfg.data.packing else ())
    return {k: shd.batch_sharding(mesh, 2) for k in keys}


def means(sums: dict) -> dict[str, float]:
    """Means over every held-out target token: loss, accuracy, and perplexity = exp(loss)."""
    tokens = max(sums.pop("tokens"), 1.0)
    out = {k: v / tokens for k, v in sums.items()}
    return {**out, "perplexity": float(np.exp(min(out["loss"], 50.0)))}


def _work(batch: dict):
    b, t = batch["input_ids"].shape
    return t, b, {"tokens": batch["attention_mask"].sum(),
                  "target_tokens": batch["loss_mask"].sum()}


STAGE = SupervisedStage(head="lm", load=load_sft, write_generated=movies.write_demonstrations,
                        steps=_steps, batch_shardings=_batch_shardings, means=means, work=_work)


def train(cfg: SFTConfig, log: Callable[[str], None] = print, progress_desc: str = "sft") -> dict:
    """Trains (or resumes) a causal LM on demonstrations as `cfg` says (see
    `rlhf_jax.train.loop.run` for what it writes); returns the held-out metrics and the export
    path."""
    result = run(cfg, lambda c, mesh, log: SupervisedJob(c, STAGE, mesh, log),
                 perf.mfu_ceiling_flops_per_s(), log, progress_desc)
    result.pop("job", None)
    return result


def _summary(result: dict) -> str:
    steps = f"after {result['steps']} steps"
    if not result["eval"]:
        return f"trained {steps}"
    order = ["loss", "perplexity", "accuracy"]
    return f"held-out {steps}: " + ", ".join(f"{k} {result['eval'][k]:.4f}" for k in order)


def cli(argv: Sequence[str]) -> int:
    """`rlhf-jax sft --config FILE key.sub=value ...`."""
    return command(argv, name="sft", config_class=SFTConfig, train=train, summary=_summary,
                   description="Supervised fine-tuning of a causal LM on demonstrations "
                               "(or pretraining).",
                   example="optim.learning_rate=1e-4 steps=100")
