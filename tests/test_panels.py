"""Column panels (rlhf_jax/models/panels.py): the CPU decode layout gives the same rollouts, and
the rule that decides where it is used (`panels_pay`)."""

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import FAMILIES, padded_batch
from rlhf_jax.models import sampling as gen
from rlhf_jax import models
from rlhf_jax import sharding as shd
from rlhf_jax.models import panels
from rlhf_jax.models.panels import column_panels, decode_panels
from rlhf_jax.world.tiny import tiny_config


def test_column_panels_are_aligned_contiguous_columns_of_the_kernel():
    rng = np.random.default_rng(0)
    kernels = [rng.normal(size=(48, 200)).astype(np.float32) for _ in range(3)]
    for dtype in (np.float32, ml_dtypes.bfloat16):
        per_layer = column_panels(kernels, dtype, width=64)
        assert len(per_layer) == 3
        for kernel, panels in zip(kernels, per_layer):
            assert [p.shape for p in panels] == [(48, 64)] * 3 + [(48, 8)]
            assert all(p.dtype == dtype and p.flags.c_contiguous for p in panels)
            assert all(p.ctypes.data % 64 == 0 for p in panels)
            np.testing.assert_array_equal(np.concatenate(panels, axis=1),
                                          kernel.astype(dtype))
    # Aligned host buffers become device arrays on CPU without a copy.
    panels = column_panels(kernels, np.float32)[1]
    placed = jax.device_put(panels, jax.devices("cpu")[0])
    assert all(a.unsafe_buffer_pointer() == p.ctypes.data for a, p in zip(placed, panels))


def _config(family):
    # Widths that 64 does not divide: intermediate 96, vocabulary 131; llama is untied.
    return tiny_config(family, vocab_size=131, hidden_size=64, intermediate_size=96,
                       scan_layers=family != "qwen2")


@pytest.mark.parametrize("family", FAMILIES)
def test_panel_decoding_gives_the_rollout_of_the_plain_kernels(family):
    model, params = models.init_model(_config(family), seed=3)
    params = jax.tree.map(lambda x: x * 3.0, params)  # sharp distributions: tokens vary
    ids, mask = padded_batch((7, 3, 5, 1), 8, vocab=131)
    for sampling in (dict(greedy=True), dict(temperature=1.0, top_k=50)):
        cfg = gen.SamplingConfig(max_new_tokens=12, stop_at_eos=False, **sampling)
        outs = [jax.device_get(gen.make_generate_fn(model, cfg, cpu_panels=panels)(
            params, ids, mask, jax.random.key(1))) for panels in (True, False)]
        np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
        np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
        assert len(np.unique(outs[0].tokens)) > 8


def test_panels_leave_the_rollout_placed_as_the_plain_kernels_do():
    """Panels committed to a device would commit the rollout, and each jitted step fed with it
    (PPO's score and update) would compile a second time."""
    model, params = models.init_model(_config("gpt2"), seed=3)
    ids, mask = padded_batch((7, 3, 5, 1), 8, vocab=131)
    cfg = gen.SamplingConfig(max_new_tokens=4)
    for placed in (params, jax.device_put(params, jax.devices()[1])):
        outs = [gen.make_generate_fn(model, cfg, cpu_panels=panels)(
            placed, ids, mask, jax.random.key(1)) for panels in (True, False)]
        assert outs[0].tokens.committed == outs[1].tokens.committed
        assert outs[0].tokens.devices() == outs[1].tokens.devices()


def test_decode_steps_read_the_panels_not_the_kernels():
    cfg = _config("llama")
    model, params = models.init_model(cfg, seed=3)
    _, other = models.init_model(cfg, seed=4)
    ids, mask = padded_batch((7, 3, 5, 1), 8, vocab=131)
    sampling = gen.SamplingConfig(max_new_tokens=12, greedy=True, stop_at_eos=False)
    fn = jax.jit(lambda p, panels: gen.generate(p, ids, mask, jax.random.key(0), panels,
                                                model=model, cfg=sampling))
    own = fn(params, jax.device_put(decode_panels(cfg, params)))
    swapped = fn(params, jax.device_put(decode_panels(cfg, other)))
    # The first token comes from the prefill (kernels), the rest from decode steps (panels).
    np.testing.assert_array_equal(own.tokens[:, 0], swapped.tokens[:, 0])
    assert (np.asarray(own.tokens[:, 1:]) != np.asarray(swapped.tokens[:, 1:])).mean() > 0.5


def test_panels_are_cut_once_per_params_and_only_where_they_apply(monkeypatch):
    cfg = _config("gpt2")
    model, params = models.init_model(cfg, seed=3)
    cuts = []
    monkeypatch.setattr(panels, "decode_panels", lambda *a: cuts.append(1) or decode_panels(*a))
    ids, mask = padded_batch((7, 3, 5, 1, 8, 2, 6, 4), 8, vocab=131)
    fn = gen.make_generate_fn(model, gen.SamplingConfig(max_new_tokens=6, greedy=True))
    ref = jax.device_get(fn(params, ids, mask, jax.random.key(0)))
    fn(params, ids, mask, jax.random.key(1))
    assert len(cuts) == 1  # same params: the panels are reused
    changed = jax.tree.map(lambda x: x + 0.0, params)
    out = fn(changed, ids, mask, jax.random.key(0))
    assert len(cuts) == 2  # new params (equal values, other arrays): cut again
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    for shape, cut in (((8, 1, 1), True), ((2, 2, 2), False)):  # replicated / tensor-parallel
        mesh = shd.make_mesh(shape)
        _, placed = models.init_model(cfg, seed=3, mesh=mesh)
        before = len(cuts)
        with shd.use_mesh(mesh):
            out = fn(placed, shd.shard_batch(ids, mesh), shd.shard_batch(mask, mesh),
                     jax.random.key(0))
        assert len(cuts) == before + cut
        np.testing.assert_array_equal(jax.device_get(out.tokens), ref.tokens)
    # Inside another jit the params are traced: the plain kernels are used.
    before = len(cuts)
    traced = jax.jit(lambda p: fn(p, ids, mask, jax.random.key(0)).tokens)(params)
    np.testing.assert_array_equal(traced, ref.tokens)
    assert len(cuts) == before


# --- the rule: panels where their longer compile is paid back (panels.panels_pay).

QWEN2_05B = models.TransformerConfig(  # Qwen2-0.5B's shape
    family="qwen2", num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2,
    intermediate_size=4864, vocab_size=151936, qkv_bias=True, tie_word_embeddings=True)
BASE = models.TransformerConfig(  # the base benchmark model (benchmarks/common.py)
    family="gpt2", num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072,
    vocab_size=8192, qkv_bias=True, tie_word_embeddings=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_panel_count_is_the_number_of_panels_cut(family):
    cfg = _config(family)
    _, params = models.init_model(cfg, seed=3)
    assert panels.panel_count(cfg) == len(jax.tree.leaves(decode_panels(cfg, params)))


def test_the_rule_keeps_panels_for_small_models_that_decode_many_batches():
    # By hand: base 12 × (3·12 + 12 + 48 + 12) + 8192/64; Qwen2-0.5B 24 × (14 + 2·2 + 14 +
    # 2·76 + 14) + 151936/64.
    assert panels.panel_count(BASE) == 12 * 108 + 128 == 1424
    assert panels.panel_count(QWEN2_05B) == 24 * 198 + 2374 == 7126
    small = _config("qwen2")
    assert panels.panels_pay(small) and panels.panels_pay(BASE)
    assert not panels.panels_pay(QWEN2_05B)  # first call +86 s, for 0.3-1.3 s a call
    assert not panels.panels_pay(QWEN2_05B, calls=10_000)
    assert not panels.panels_pay(BASE, calls=panels.MIN_CALLS - 1)
    assert panels.panels_pay(BASE, calls=panels.MIN_CALLS)


def test_make_generate_fn_follows_the_rule_and_the_tokens_stay_the_same(monkeypatch):
    cfg = _config("qwen2")
    model, params = models.init_model(cfg, seed=3)
    params = jax.tree.map(lambda x: x * 3.0, params)
    cuts = []
    monkeypatch.setattr(panels, "decode_panels", lambda *a: cuts.append(1) or decode_panels(*a))
    ids, mask = padded_batch((7, 3, 5, 1), 8, vocab=131)
    sampling = gen.SamplingConfig(max_new_tokens=8, temperature=1.0, stop_at_eos=False)
    outs = []
    for max_panels, cut in ((panels.MAX_PANELS, 1), (panels.panel_count(cfg) - 1, 0)):
        monkeypatch.setattr(panels, "MAX_PANELS", max_panels)
        before = len(cuts)
        outs.append(jax.device_get(gen.make_generate_fn(model, sampling)(
            params, ids, mask, jax.random.key(2))))
        assert len(cuts) - before == cut  # panels cut (and used) only where the rule says so
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
    assert len(np.unique(outs[0].tokens)) > 8
