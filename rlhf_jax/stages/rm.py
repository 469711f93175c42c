"""Reward-model training: the Bradley-Terry step, and the loop that drives it.

For a batch of B preference pairs with scores r_c = r(x, y_chosen), r_r = r(x, y_rejected),
per-pair margin m and weight w (0 at empty slots):

    L = Σ_b w_b · [ −log σ(r_c − r_r − s·m)  +  λ · (r_c + r_r)² ]  /  Σ_b w_b

s = `margin_scale` (Llama 2's margin), λ = `center_coef` (reward centering, Eisenstein et
al. 2023: keeps scores near zero, which the Bradley-Terry loss alone leaves free).

    rlhf-jax rm --config configs/rm_tiny.yaml steps=200 out_dir=runs/rm
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax import models, perf
from rlhf_jax import sharding as shd
from rlhf_jax.config import check
from rlhf_jax.data import DataConfig, PreferenceData, load_preferences
from rlhf_jax.rl import losses
from rlhf_jax.train import optim
from rlhf_jax.train.loop import command, run
from rlhf_jax.train.supervised import (
    GeneratedData, SupervisedConfig, SupervisedJob, SupervisedStage,
)
from rlhf_jax.world import preferences

# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class RMDataConfig(GeneratedData, DataConfig):
    """The preference data (the fields of `rlhf_jax.data.DataConfig`), or generated ones.

    Attributes:
      synthetic: generate a toy preference dataset and its tokenizer
        (`rlhf_jax.world.preferences`) instead of reading `train`/`eval`.
    """

    synthetic: Optional[preferences.SyntheticConfig] = None


@dataclasses.dataclass(frozen=True)
class RMConfig(SupervisedConfig):
    """A reward-model training run: the fields of
    `rlhf_jax.train.supervised.SupervisedConfig` (batch_size counts preference pairs; the
    export is a sequence-classification model) and

    Attributes:
      data: preference data (see RMDataConfig).
      margin_scale: s in −log σ(r_c − r_r − s·m), for data with a margin column
        (0 = ignore the margins).
      center_coef: λ of the reward-centering term λ·(r_c + r_r)² (0 = off).
      normalise_after_training: set the model's gain and bias so that scores of the held-out
        responses (training ones without a held-out split) have mean 0 and std 1.
    """

    out_dir: str = "runs/rm"
    data: RMDataConfig = RMDataConfig(synthetic=preferences.SyntheticConfig())
    margin_scale: float = 1.0
    center_coef: float = 0.0
    normalise_after_training: bool = False

    def __post_init__(self):
        super().__post_init__()
        check(self.center_coef >= 0, "center_coef", self.center_coef, "0 (off) or more")


CONFIG_CLASS = RMConfig

# ----------------------------------------------------------------------------- step


def pair_scores(params: Any, batch: dict, model) -> tuple[jax.Array, jax.Array]:
    """(r_chosen [B], r_rejected [B]) from ONE forward pass over the 2B sequences.

    batch["input_ids"] is [B, 2, T] (chosen, rejected next to each other), so the reshape
    to [2B, T] keeps each pair on the device that holds it.
    """
    b, _, t = batch["input_ids"].shape
    scores = model.apply(
        {"params": params},
        batch["input_ids"].reshape(2 * b, t),
        batch["attention_mask"].reshape(2 * b, t),
    )  # [2B]
    scores = scores.astype(jnp.float32).reshape(b, 2)
    return scores[:, 0], scores[:, 1]


def pair_loss(
    chosen: jax.Array,
    rejected: jax.Array,
    margin: jax.Array,
    weight: jax.Array,
    margin_scale: float = 1.0,
    center_coef: float = 0.0,
) -> tuple[jax.Array, tuple[jax.Array, dict]]:
    """Σ_b w_b · [−log σ(r_c − r_r − s·m) + λ (r_c + r_r)²], its pair count and metric sums.

    All inputs [B]. Returns (loss_sum, (Σ w, sums of loss, bt_loss, accuracy, margin)),
    the shape `optim.accumulate_gradients` expects.
    """
    bt = losses.bradley_terry_loss(chosen, rejected, margin_scale * margin)  # [B]
    center = center_coef * (chosen + rejected) ** 2  # [B]
    loss_sum = jnp.sum(weight * (bt + center))
    sums = {
        "loss": loss_sum,
        "bt_loss": jnp.sum(weight * bt),
        "accuracy": jnp.sum(weight * (chosen > rejected)),
        "margin": jnp.sum(weight * (chosen - rejected)),
    }
    return loss_sum, (jnp.sum(weight), sums)


def loss_fn(params: Any, batch: dict, *, model, margin_scale: float, center_coef: float):
    chosen, rejected = pair_scores(params, batch, model)
    return pair_loss(chosen, rejected, batch["margin"], batch["weight"], margin_scale, center_coef)


def train_step(
    state: optim.TrainState,
    batch: dict,
    *,
    model,
    tx: optax.GradientTransformation,
    grad_accum: int = 1,
    margin_scale: float = 1.0,
    center_coef: float = 0.0,
) -> tuple[optim.TrainState, dict]:
    """One reward-model update on `batch` (see rlhf_jax.data.preference for its layout).

    Close over everything after `*` with `functools.partial`, then jit with
    `donate_argnums=0`. A non-finite update keeps the old params (the step still counts);
    `finite` in the metrics says so.

    Returns:
      (new state, metrics): loss, bt_loss, accuracy, margin (means over pairs), grad_norm,
      update_norm, pairs (count) and finite.
    """
    loss = functools.partial(loss_fn, model=model, margin_scale=margin_scale,
                             center_coef=center_coef)
    new_state, metrics, count = optim.gradient_step(state, loss, batch, tx, grad_accum)
    return new_state, {**metrics, "pairs": count}


def eval_step(params: Any, batch: dict, *, model, margin_scale: float = 1.0,
              center_coef: float = 0.0) -> dict:
    """Metric sums over one batch (divide by `pairs` after adding up all batches)."""
    _, (count, sums) = loss_fn(params, batch, model=model, margin_scale=margin_scale,
                               center_coef=center_coef)
    return {**sums, "pairs": count}


def score_moments(params: Any, batch: dict, *, model) -> dict:
    """Σ w, Σ w·s and Σ w·s² over the chosen and rejected scores s of a batch (for normalising)."""
    chosen, rejected = pair_scores(params, batch, model)
    w = batch["weight"]
    return {"count": 2 * jnp.sum(w), "sum": jnp.sum(w * (chosen + rejected)),
            "sum_sq": jnp.sum(w * (chosen**2 + rejected**2))}


def reward_normalisation(
    mean: float, std: float, gain: float = 1.0, bias: float = 0.0
) -> tuple[float, float]:
    """(gain', bias') that turn scores s = gain·(w·h) + bias of this mean and std into
    (s − mean) / std = (gain/std)·(w·h) + (bias − mean)/std."""
    std = std if std > 1e-8 else 1.0
    return gain / std, (bias - mean) / std


# ----------------------------------------------------------------------------- the stage


def _steps(cfg: RMConfig, model, tx) -> tuple[Callable, Callable]:
    loss_args = {"margin_scale": cfg.margin_scale, "center_coef": cfg.center_coef}
    return (functools.partial(train_step, model=model, tx=tx, grad_accum=cfg.grad_accum,
                              **loss_args),
            functools.partial(eval_step, model=model, **loss_args))


def batch_shardings(cfg: RMConfig, mesh) -> dict:
    """Pairs split over data × fsdp; each pair's two sequences stay on one device."""
    return {"input_ids": shd.batch_sharding(mesh, 3), "attention_mask": shd.batch_sharding(mesh, 3),
            "margin": shd.batch_sharding(mesh, 1), "weight": shd.batch_sharding(mesh, 1)}


def means(sums: dict) -> dict[str, float]:
    """Means over every held-out pair: loss, bt_loss, accuracy, margin."""
    pairs = max(sums.pop("pairs"), 1.0)
    return {k: v / pairs for k, v in sums.items()}


def normalised(model, params, data: PreferenceData, mesh):
    """`model` with gain and bias set so that its scores on `data` have mean 0 and std 1."""
    moments_fn = jax.jit(functools.partial(score_moments, model=model),
                         out_shardings=shd.replicated(mesh))
    total = np.zeros(3)
    for batch in data.epoch_batches(0):
        m = jax.device_get(moments_fn(params, shd.shard_batch(batch, mesh)))
        total += [float(m["count"]), float(m["sum"]), float(m["sum_sq"])]
    mean = total[1] / total[0]
    std = math.sqrt(max(total[2] / total[0] - mean**2, 0.0))
    gain, bias = reward_normalisation(mean, std, model.gain, model.bias)
    return models.make_model(model.cfg, "reward", gain=gain, bias=bias)


def _work(batch: dict):
    b, _, t = batch["input_ids"].shape
    return t, 2 * b, {"pairs": batch["weight"].sum(), "tokens": batch["attention_mask"].sum()}


def _finish(job: SupervisedJob, params):
    """Reward normalisation (when configured); gain and bias go with the final checkpoint."""
    model = job.model
    if job.cfg.normalise_after_training:
        data = job.held_out if job.held_out is not None else job.train_data
        model = normalised(model, params, data, job.mesh)
        job.log(f"reward normalisation: gain {model.gain:.4g}, bias {model.bias:.4g}")
    return model, {"reward_gain": model.gain, "reward_bias": model.bias}


STAGE = SupervisedStage(head="reward", load=load_preferences,
                        write_generated=preferences.write_dataset, steps=_steps,
                        batch_shardings=batch_shardings, means=means, work=_work,
                        postfix=("train/loss", "train/accuracy"), finish=_finish)


def train(cfg: RMConfig, log: Callable[[str], None] = print, progress_desc: str = "rm") -> dict:
    """Trains (or resumes) a reward model as `cfg` says (see `rlhf_jax.train.loop.run` for
    what it writes); returns the held-out metrics, the export path and the final gain and
    bias."""
    result = run(cfg, lambda c, mesh, log: SupervisedJob(c, STAGE, mesh, log),
                 perf.mfu_ceiling_flops_per_s(), log, progress_desc)
    if result.get("preempted"):
        return result
    model = result.pop("job").model
    return {**result, "gain": model.gain, "bias": model.bias}


def _summary(result: dict) -> str:
    steps = f"after {result['steps']} steps"
    if not result["eval"]:
        return f"trained {steps}"
    order = ["loss", "accuracy", "margin", "bt_loss"]
    return f"held-out {steps}: " + ", ".join(f"{k} {result['eval'][k]:.4f}" for k in order
                                             if k in result["eval"])


def cli(argv: Sequence[str]) -> int:
    """`rlhf-jax rm --config FILE key.sub=value ...`."""
    return command(argv, name="rm", config_class=RMConfig, train=train, summary=_summary,
                   description="Train a reward model on preference pairs (Bradley-Terry).",
                   example="optim.learning_rate=1e-4 steps=100")
