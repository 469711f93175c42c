"""The PPO loop: it learns a rule-based reward, runs from Hugging Face directories through the
CLI, resumes exactly, and gives the same iteration on a device mesh."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import models
from rlhf_jax.train import optim
from rlhf_jax.rl import ppo
from rlhf_jax import sharding as shd
from rlhf_jax.train.checkpoint import CheckpointConfig
from rlhf_jax.data.prompts import PromptDataConfig
from rlhf_jax.models.sampling import SamplingConfig
from rlhf_jax.train.logging import read_jsonl
from rlhf_jax.train.optim import OptimizerConfig
from rlhf_jax.rl.engine import PPOEngine
from rlhf_jax.stages.ppo import PPORunConfig, train
from rlhf_jax.world.tiny import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
V, P, R, B, TARGET = 32, 4, 8, 16, 5


class CountReward(nn.Module):
    """Reward = how many times TARGET appears in the response (no params)."""

    @nn.compact
    def __call__(self, ids, mask, per_token=False):
        return jnp.sum((ids[:, P:] == TARGET) * mask[:, P:], axis=1).astype(jnp.float32)


def engine_setup(value_kind="separate", mesh=None, lr=1e-3):
    cfg = tiny_config("llama", vocab_size=V)
    shared = value_kind == "shared"
    policy, pp = models.init_model(cfg, "lm+value" if shared else "lm", seed=0, mesh=mesh)
    params = {"policy": pp}
    critic = None
    if not shared:
        critic, params["critic"] = models.init_model(cfg, "reward", seed=1, mesh=mesh)
    pcfg = ppo.PPOConfig(kl_coef=0.01, ppo_epochs=4, num_minibatches=2, vf_coef=0.5,
                         value_kind=value_kind)
    tx = optim.make_optimizer(OptimizerConfig(learning_rate=lr, weight_decay=0.0), 100)
    sampling = SamplingConfig(max_new_tokens=R, stop_at_eos=False, prompt_bucket=P)
    engine = PPOEngine(policy, critic, CountReward(), pcfg, sampling, tx, None, 0, seed=0,
                       mesh=mesh)
    return engine, engine.init_state(params), {"ref": jax.tree_util.tree_map(jnp.copy, pp),
                                                   "reward": {}}


def prompts(mesh=None):
    rng = np.random.default_rng(0)
    ids, mask = rng.integers(3, V, (B, P)).astype(np.int32), np.ones((B, P), np.int32)
    return shd.shard_batch((ids, mask), mesh) if mesh is not None else (ids, mask)


@pytest.mark.parametrize("value_kind", ["separate", "shared"])
def test_ppo_raises_a_rule_based_reward(value_kind):
    engine, state, frozen = engine_setup(value_kind, lr=3e-3)
    ids, mask = prompts()
    history = []
    for it in range(20):
        state, metrics, _, _ = engine.iteration(state, frozen, ids, mask, it)
        history.append(metrics)
    start = history[0]["env/score"]  # a random policy: about R / V = 0.25 target tokens
    end = np.mean([h["env/score"] for h in history[-3:]])
    assert start < 1.0 and end > 5.0, (start, end)  # of at most R = 8
    kls = [h["env/kl"] for h in history]
    assert kls[0] == pytest.approx(0.0, abs=1e-5)  # policy == reference at the start
    assert all(np.isfinite(kls)) and kls[-1] > 0.1  # moved away, reported, finite
    assert all(h["ppo/finite"] == 1.0 for h in history)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1)])
def test_sharded_iteration_matches_one_device(shape):
    def run(mesh):
        engine, state, frozen = engine_setup(mesh=mesh)
        out = []
        for it in range(2):
            state, metrics, rollout, _ = engine.iteration(state, frozen, *prompts(mesh), it)
            out.append((metrics, jax.device_get(rollout.tokens)))
        return out

    ref = run(None)
    mesh = shd.make_mesh(shape)
    with shd.use_mesh(mesh):
        got = run(mesh)
    for (m, tokens), (rm, rtokens) in zip(got, ref):
        np.testing.assert_array_equal(tokens, rtokens)
        for k in ("env/score", "env/kl", "env/explained_variance", "ppo/loss", "ppo/policy_loss",
                  "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/grad_norm"):
            np.testing.assert_allclose(m[k], rm[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_state_optimizer_moments_are_sharded_like_the_params():
    """Adam's moments follow their params' shardings, at the start and after an update: left to
    XLA they were replicated (an 8B PPO then needs 123 GB per v5p chip instead of 10.9)."""
    mesh = shd.make_mesh((1, 8, 1))

    def check(state):
        params = jax.tree_util.tree_leaves(state.train.params)
        split = [p for p in params if not p.sharding.is_fully_replicated]
        assert len(split) >= len(params) // 2  # the matrices and embeddings are split on fsdp
        for name in ("mu", "nu"):
            moments = jax.tree_util.tree_leaves(optax.tree_utils.tree_get(state.train.opt_state,
                                                                          name))
            assert len(moments) == len(params)
            for p, m in zip(params, moments):
                assert m.sharding.is_equivalent_to(p.sharding, p.ndim), (name, p.shape)
        leaves = jax.tree_util.tree_leaves(state.train.opt_state)
        on_device0 = sum(s.data.nbytes for x in leaves for s in x.addressable_shards
                         if s.device == mesh.devices.flat[0])
        assert on_device0 < sum(x.nbytes for x in leaves) / 4

    with shd.use_mesh(mesh):
        engine, state, frozen = engine_setup(mesh=mesh)
        check(state)  # as created
        check(engine.iteration(state, frozen, *prompts(mesh), 0)[0])  # as the update returns it


# ----------------------------------------------------------------------------- the configured run


def run_config(root, out, **overrides):
    base = PPORunConfig(
        out_dir=str(out), policy=str(root / "policy"), reward_model=str(root / "rm"),
        prompts=PromptDataConfig(train=str(root / "prompts.jsonl"), eval_fraction=0.2,
                                 max_prompt_length=16),
        sampling=SamplingConfig(max_new_tokens=8, prompt_bucket=8),
        ppo=ppo.PPOConfig(ppo_epochs=2, num_minibatches=2),
        optim=OptimizerConfig(learning_rate=1e-3), batch_size=8, iterations=4, sample_every=2,
        checkpoint=CheckpointConfig(every=2, async_save=False), export=False,
    )
    return dataclasses.replace(base, **overrides)


def test_resumed_run_ends_with_the_same_params(ppo_inputs, tmp_path):
    full = train(run_config(ppo_inputs, tmp_path / "full"), log=lambda s: None)
    half = train(run_config(ppo_inputs, tmp_path / "resumed", iterations=2), log=lambda s: None)
    assert half["iterations"] == 2
    # The same output directory, now asked for 4 iterations: continues from iteration 2.
    logs = []
    resumed = train(run_config(ppo_inputs, tmp_path / "resumed"), log=logs.append)
    assert any("resumed" in line and "step 2" in line for line in logs)
    for k, v in full["last"].items():
        if not k.startswith(("time/", "perf/")):
            assert resumed["last"][k] == v, k
    def final_params(out):
        import orbax.checkpoint as ocp

        return ocp.PyTreeCheckpointer().restore(str(out / "checkpoints" / "4" / "state"))

    a, b = final_params(tmp_path / "full"), final_params(tmp_path / "resumed")
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rows = read_jsonl(str(tmp_path / "resumed" / "metrics.jsonl"))
    assert [r["step"] for r in rows if "env/score" in r] == [1, 2, 3, 4]
    assert "eval/score" in rows[-1] and np.isfinite(rows[-1]["eval/kl"])
    samples = [json.loads(line) for line in open(tmp_path / "full" / "samples.jsonl")]
    assert [s["iteration"] for s in samples] == [2, 2, 2, 2, 4, 4, 4, 4]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "ppo", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_cli_end_to_end_and_export(ppo_inputs, tmp_path):
    proc = run_cli("--config", "configs/ppo_tiny.yaml", f"out_dir={tmp_path}",
                   f"policy={ppo_inputs / 'policy'}", f"reward_model={ppo_inputs / 'rm'}",
                   f"prompts.train={ppo_inputs / 'prompts.jsonl'}", "iterations=2", "batch_size=8",
                   "sampling.max_new_tokens=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after 2 iterations: RM score" in proc.stdout
    model, params = models.load_hf(str(tmp_path / "export"))
    assert model.cfg.vocab_size == 320
    rows = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "env/score" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("env/score", "env/kl", "env/non_score_reward", "ppo/entropy", "ppo/clipfrac",
                "ppo/approx_kl", "ppo/value_loss", "env/explained_variance",
                "env/response_length", "time/generate", "time/score", "time/advantages",
                "time/update", "perf/tokens_per_s", "perf/mfu"):
        assert key in rows[-1] and np.isfinite(rows[-1][key]), key
    assert 0 < rows[-1]["perf/mfu"] < 1 and "perf/mfu" not in rows[0]  # iteration 1 compiled


@pytest.mark.parametrize("override,needle", [
    ("ppo.kl_coeff=0.1", "kl_coef"),
    ("batch_size=7", "batch_size"),
    ("sampling.temperature=0.7", "sampling.temperature"),
    ("mesh=[3,1,1]", "mesh"),
])
def test_cli_config_mistakes_are_one_line(override, needle, tmp_path):
    proc = run_cli("--config", "configs/ppo_tiny.yaml", f"out_dir={tmp_path}", override)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
