"""Reward-model training: the loss against numpy, sharded = one device, accumulation, learning
a hidden rule, export parity with transformers, and the CLI in a subprocess."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import padded_batch
from rlhf_jax import config, models
from rlhf_jax.train import optim
from rlhf_jax.stages import rm
from rlhf_jax.train.supervised import compile_steps
from rlhf_jax import sharding as shd
from rlhf_jax.world.tiny import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- loss


def numpy_loss(c, r, m, w, s, lam):
    """Mean over weighted pairs of −log σ(c − r − s·m) + λ (c + r)², written out."""
    total, grad_c, grad_r = 0.0, np.zeros_like(c), np.zeros_like(r)
    for i in range(len(c)):
        d = c[i] - r[i] - s * m[i]
        sig = 1.0 / (1.0 + np.exp(-d))
        total += w[i] * (-np.log(sig) + lam * (c[i] + r[i]) ** 2)
        # d/dc [−log σ(d)] = −(1 − σ(d)); d/dr = +(1 − σ(d))
        grad_c[i] = w[i] * (-(1 - sig) + 2 * lam * (c[i] + r[i]))
        grad_r[i] = w[i] * ((1 - sig) + 2 * lam * (c[i] + r[i]))
    n = w.sum()
    return total / n, grad_c / n, grad_r / n


@pytest.mark.parametrize("use_margin,center", [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_loss_and_gradient_match_numpy(use_margin, center):
    rng = np.random.default_rng(0)
    c, r = rng.normal(size=12) * 3, rng.normal(size=12) * 3
    m = rng.uniform(0, 2, 12) if use_margin else np.zeros(12)
    w = (rng.uniform(size=12) > 0.2).astype(np.float64)

    def mean_loss(c, r):
        total, (count, _) = rm.pair_loss(c, r, jnp.asarray(m), jnp.asarray(w), 1.0, center)
        return total / count

    want, want_gc, want_gr = numpy_loss(c, r, m, w, 1.0, center)
    got = mean_loss(jnp.asarray(c), jnp.asarray(r))
    gc, gr = jax.grad(mean_loss, argnums=(0, 1))(jnp.asarray(c), jnp.asarray(r))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gc), want_gc, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gr), want_gr, rtol=1e-5, atol=1e-7)
    _, (count, sums) = rm.pair_loss(jnp.asarray(c), jnp.asarray(r), jnp.asarray(m), jnp.asarray(w))
    assert float(count) == w.sum()
    np.testing.assert_allclose(float(sums["accuracy"]), (w * (c > r)).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(sums["margin"]), (w * (c - r)).sum(), rtol=1e-5)


def test_normalisation_gives_mean_zero_std_one():
    scores = np.random.default_rng(1).normal(3.0, 2.5, 100)
    gain, bias = rm.reward_normalisation(scores.mean(), scores.std(), gain=2.0, bias=0.5)
    raw = (scores - 0.5) / 2.0  # w·h behind scores = 2·(w·h) + 0.5
    normed = gain * raw + bias
    assert abs(normed.mean()) < 1e-9 and abs(normed.std() - 1) < 1e-9


# ----------------------------------------------------------------------------- sharding


def random_batch(b=16, t=16, seed=0, vocab=128):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, t + 1, 2 * b)
    ids, mask = padded_batch(lengths, t, vocab=vocab, left=False, seed=seed)
    return {"input_ids": ids.reshape(b, 2, t), "attention_mask": mask.reshape(b, 2, t),
            "margin": rng.uniform(0, 1, b).astype(np.float32),
            "weight": (np.arange(b) < b - 3).astype(np.float32)}  # 3 empty slots


def run_steps(mesh_shape, grad_accum=1, steps=4, family="llama"):
    devices = jax.devices() if np.prod(mesh_shape) > 1 else jax.devices()[:1]
    mesh = shd.make_mesh(mesh_shape, devices)
    model_cfg = tiny_config(family, vocab_size=128, scan_layers=False)  # compiles in half the time
    model, params = models.init_model(model_cfg, "reward", seed=0, mesh=mesh)
    tx = optim.make_optimizer(optim.OptimizerConfig(learning_rate=1e-3), steps)
    state, shardings = optim.sharded_state(models.abstract_params(model), params, tx, mesh)
    cfg = rm.RMConfig(grad_accum=grad_accum, center_coef=0.01)
    step, _ = compile_steps(rm.STAGE, cfg, model, tx, mesh, shardings)
    losses = []
    with shd.use_mesh(mesh):
        for k in range(steps):
            state, metrics = step(state, shd.shard_batch(random_batch(seed=k % 2), mesh))
            losses.append(float(metrics["loss"]))
            assert bool(metrics["finite"]) and float(metrics["pairs"]) == 13
    return np.asarray(losses), jax.device_get(state.params)


def assert_trees_close(a, b, atol=1e-5):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=atol), a, b)


@functools.lru_cache(maxsize=None)
def one_device_run(grad_accum=1):
    return run_steps((1, 1, 1), grad_accum)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_loss_curve_matches_one_device(shape):
    ref_losses, ref_params = one_device_run()
    losses, params = run_steps(shape)
    assert ref_losses[2] < ref_losses[0]  # it learns something: the comparison is not vacuous
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    assert_trees_close(params, ref_params)


def test_gradient_accumulation_matches_one_batch():
    ref_losses, ref_params = one_device_run()
    losses, params = one_device_run(grad_accum=2)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5)
    assert_trees_close(params, ref_params)


# ----------------------------------------------------------------------------- training


def tiny_run_config(out, *overrides):
    return config.load(rm.RMConfig, ROOT / "configs" / "rm_tiny.yaml", [
        f"out_dir={out}", "steps=80", "eval_every=40", "log_every=10", "checkpoint.every=0",
        "data.synthetic.num_train=2560", "data.synthetic.num_eval=200", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    cfg = tiny_run_config(out)
    return cfg, rm.train(cfg, log=lambda _: None)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_tiny_model_learns_the_hidden_rule(trained):
    cfg, result = trained
    assert result["eval"]["accuracy"] >= 0.9, result
    assert result["eval"]["margin"] > 0
    records = read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"))
    evals = [r for r in records if "eval/accuracy" in r]
    assert [r["step"] for r in evals][:2] == [40, 80] and evals[-1]["eval/accuracy"] >= 0.9
    train_loss = [r["train/loss"] for r in records if "train/loss" in r]
    assert train_loss[-1] < 0.5 * train_loss[0]
    assert any("perf/pairs_per_s" in r and "perf/mfu" in r for r in records)
    assert os.path.isdir(os.path.join(cfg.out_dir, "checkpoints", "80"))


def held_out_batch(cfg, tokenizer):
    from rlhf_jax.data import DataConfig, load_preferences

    path = os.path.join(cfg.out_dir, "synthetic", "eval.jsonl")
    data_cfg = DataConfig(train=path, max_length=cfg.data.max_length, shuffle=False)
    data, _ = load_preferences(data_cfg, tokenizer, batch_size=64, seed=0)
    return data.batch(0)


def test_normalised_export_scores_the_same_in_transformers(trained):
    import torch
    import transformers

    cfg, result = trained
    export = result["export"]
    model, params = models.load_hf(export)
    tokenizer = models.load_tokenizer(export)
    batch = held_out_batch(cfg, tokenizer)
    ids = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1])
    mask = batch["attention_mask"].reshape(ids.shape)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert abs(ours.mean()) < 0.2 and abs(ours.std() - 1) < 0.2  # normalised on the held-out set
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(export).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long)).logits[:, 0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    chosen, rejected = theirs.reshape(-1, 2).T
    assert (chosen > rejected).mean() >= 0.9


def test_normalisation_stored_with_the_checkpoint(trained):
    cfg, result = trained
    with open(os.path.join(cfg.out_dir, "checkpoints", "80", "meta", "metadata")) as f:
        meta = json.load(f)  # the checkpoint's JSON item
    assert meta["reward_gain"] == pytest.approx(result["gain"]) and meta["data_position"] == 80
    assert meta["config"]["steps"] == 80 and result["gain"] != 1.0


def test_starts_from_a_hugging_face_causal_lm(tmp_path):
    import transformers

    hf_cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=512, n_positions=64,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "lm")
    out = tmp_path / "run"
    cfg = tiny_run_config(out, "model.init=null", f"model.path={tmp_path / 'lm'}",
                          f"model.tokenizer={out / 'synthetic' / 'tokenizer'}", "steps=3",
                          "eval_every=0", "export=false", "normalise_after_training=false")
    result = rm.train(cfg, log=lambda _: None)
    assert np.isfinite(result["eval"]["loss"]) and result["export"] is None
    small = tiny_run_config(tmp_path / "run2", "model.init=null", f"model.path={tmp_path / 'lm'}",
                            f"model.tokenizer={out / 'synthetic' / 'tokenizer'}")
    hf_cfg.vocab_size = 100
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(tmp_path / "lm")
    with pytest.raises(config.ConfigError, match=r"tokenizer has \d+ tokens .* only 100"):
        rm.train(small, log=lambda _: None)


# ----------------------------------------------------------------------------- CLI


def run_cli(*args, timeout=300):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "rm", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def test_cli_smoke(tmp_path):
    proc = run_cli("--config", "configs/rm_tiny.yaml", "steps=4", f"out_dir={tmp_path}",
                   "data.synthetic.num_train=256", "data.synthetic.num_eval=32", "log_every=2",
                   "eval_every=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
    assert os.path.isdir(tmp_path / "checkpoints" / "4")
    assert os.path.exists(tmp_path / "export" / "config.json")
    assert "held-out after 4 steps: loss" in proc.stdout


def test_cli_bad_key_is_one_line_naming_the_closest(tmp_path):
    proc = run_cli("--config", "configs/rm_tiny.yaml", "optim.learning_rat=1e-3",
                   f"out_dir={tmp_path}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean 'optim.learning_rate'?" in lines[0], proc.stderr
