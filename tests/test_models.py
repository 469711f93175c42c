"""The transformer itself: padding, KV cache, remat, bfloat16, scanned vs unrolled layers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FAMILIES, padded_batch
from rlhf_jax import models
from rlhf_jax.world.tiny import tiny_config


def init(cfg, head="lm", seed=0):
    return models.init_model(cfg, head, seed=seed)


def wide(params, scale=8.0):
    """Scales kernels up so attention patterns are sharp and errors cannot hide."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * scale if "kernel" in jax.tree_util.keystr(p) else x, params
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_left_and_right_gives_unpadded_logits(family):
    model, params = init(tiny_config(family, vocab_size=97))
    params = wide(params)
    ids, _ = padded_batch((9,), 9)
    alone = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))[0]
    for left in (True, False):
        pids, pmask = padded_batch((9, 4), 14, left=left)
        pids[0] = np.where(pmask[0] == 1, np.roll(np.pad(ids[0], (0, 5)), 5 if left else 0), 0)
        out = np.asarray(model.apply({"params": params}, jnp.asarray(pids), jnp.asarray(pmask)))
        real = out[0][pmask[0].astype(bool)]
        np.testing.assert_allclose(real, alone, atol=1e-5)
        assert np.isfinite(out).all()  # padded queries too (no NaN from empty softmax rows)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_prefill_then_decode_matches_full_forward(family):
    cfg = tiny_config(family, vocab_size=97)
    model, params = init(cfg)
    params = wide(params)
    ids, mask = padded_batch((10, 6, 3), 10)
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    cache = models.init_cache(cfg, 3, 16)
    prefill = 6
    logits, cache = model.apply(
        {"params": params}, jnp.asarray(ids[:, :prefill]), jnp.asarray(mask[:, :prefill]),
        cache=cache,
    )
    steps = [np.asarray(logits)]
    step = jax.jit(lambda c, i, m: model.apply({"params": params}, i, m, cache=c))
    for t in range(prefill, 10):
        logits, cache = step(cache, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]))
        steps.append(np.asarray(logits))
    inc = np.concatenate(steps, axis=1)
    assert int(cache.index) == 10
    np.testing.assert_array_equal(np.asarray(cache.lengths), [10, 6, 3])
    real = mask.astype(bool)
    np.testing.assert_allclose(inc[real], full[real], atol=2e-5)


def test_scanned_and_unrolled_layers_agree():
    cfg = tiny_config("llama", vocab_size=97)
    scanned, params = init(cfg)
    unrolled = models.make_model(cfg.replace(scan_layers=False))
    layers = params["model"]["layers"]
    unrolled_params = {**params, "model": {
        **{k: v for k, v in params["model"].items() if k != "layers"},
        **{f"layers_{i}": jax.tree_util.tree_map(lambda x: x[i], layers)
           for i in range(cfg.num_layers)},
    }}
    ids, mask = padded_batch((8, 5), 8)
    a = scanned.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    b = unrolled.apply({"params": unrolled_params}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_remat_gives_the_same_gradients():
    cfg = tiny_config("qwen2", vocab_size=97)
    model, params = init(cfg)
    remat_model = models.make_model(cfg.replace(remat=True))
    ids, mask = padded_batch((8, 5), 8)

    def loss(m):
        return lambda p: jnp.mean(m.apply({"params": p}, jnp.asarray(ids), jnp.asarray(mask)) ** 2)

    g1 = jax.grad(loss(model))(params)
    g2 = jax.grad(loss(remat_model))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert float(jnp.abs(g1["model"]["layers"]["attn"]["q"]["kernel"]).max()) > 0


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
    cfg = tiny_config("llama", vocab_size=97)
    model, params = init(cfg)
    bf16 = models.make_model(cfg.replace(dtype="bfloat16"))
    ids, mask = padded_batch((8, 5), 8)
    a = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    b = bf16.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert b.dtype == jnp.float32  # logits are returned in float32
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    err = np.abs(a - np.asarray(b))[mask.astype(bool)].max()
    assert 0 < err < 0.05  # really computed in bfloat16, and close


@pytest.mark.parametrize("family", FAMILIES)
def test_param_count_formula(family):
    cfg = tiny_config(family, vocab_size=97)
    _, params = init(cfg)
    counted = sum(x.size for x in jax.tree_util.tree_leaves(params))
    biases = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
                 if "bias" in jax.tree_util.keystr(p) or "norm" in jax.tree_util.keystr(p))
    assert counted - biases == cfg.num_params


def test_heads_shapes_and_reward_reads_last_real_token():
    cfg = tiny_config("gpt2", vocab_size=97)
    rm, params = init(cfg, "reward")
    ids, mask = padded_batch((8, 5, 2), 8, left=False)
    per_token = rm.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask), per_token=True)
    scores = rm.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert per_token.shape == (3, 8) and scores.shape == (3,)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(per_token)[[0, 1, 2], [7, 4, 1]])
    pv, pv_params = init(cfg, "lm+value")
    logits, values = pv.apply({"params": pv_params}, jnp.asarray(ids), jnp.asarray(mask))
    assert logits.shape == (3, 8, 97) and values.shape == (3, 8)


@pytest.mark.parametrize("head", ["lm", "lm+value"])
def test_logit_columns_give_those_columns_of_the_full_logits(head):
    # PPO runs the LM head only on the columns that predict the response.
    cfg = tiny_config("llama", vocab_size=97, num_kv_heads=1)  # grouped-query: q wider than k, v
    model, params = init(cfg, head)
    params = wide(params)
    ids, mask = padded_batch((8, 5, 3), 8)
    full = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    part = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask),
                       logit_columns=(2, 7))
    if head == "lm+value":
        np.testing.assert_array_equal(np.asarray(part[1]), np.asarray(full[1]))
        full, part = full[0], part[0]
    assert part.shape == (3, 5, 97)
    np.testing.assert_allclose(np.asarray(part), np.asarray(full)[:, 2:7], atol=1e-5)
