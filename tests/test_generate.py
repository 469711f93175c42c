"""The rollout engine: parity with transformers, log-probs, filters, stopping, buckets, sharding.

The `rlhf-jax generate` command is tested in tests/test_tools_generate.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats

from conftest import FAMILIES, padded_batch
from rlhf_jax.models import sampling as gen
from rlhf_jax import models
from rlhf_jax import sharding as shd
from rlhf_jax.world.tiny import tiny_config

R = 10


_compiled = {}


def run(model, params, ids, mask, seed=0, **cfg):
    cfg = gen.SamplingConfig(**{"max_new_tokens": R, **cfg})
    fn = _compiled.setdefault((id(model), cfg), gen.make_generate_fn(model, cfg))
    return jax.device_get(fn(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(seed)))


def wide(params, scale=4.0):
    """Sharper distributions, so sampled tokens and their log-probs vary a lot."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * scale if "kernel" in jax.tree_util.keystr(p) else x, params)


def eos_splitting_rows(tokens, low=1):
    """A token that some rows of a no-stop greedy run produce (after step `low`) and some never do."""
    for t in np.unique(tokens[:, low:]):
        has = (tokens == t).any(axis=1)
        if 0 < has.sum() < len(tokens) and (tokens[has, 0] != t).all():
            return int(t)
    raise AssertionError("no token splits the rows; change the seed")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_with_left_padding_and_early_eos(hf_checkpoint, family):
    path, torch_model = hf_checkpoint(family)
    model, params = models.load_hf(path)
    ids, mask = padded_batch((7, 3, 5, 1), 8)
    free = run(model, params, ids, mask, greedy=True, stop_at_eos=False)
    eos = eos_splitting_rows(free.tokens)
    ours = jax.device_get(gen.make_generate_fn(
        model, gen.SamplingConfig(max_new_tokens=R, greedy=True), eos_token_id=eos,
    )(params, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0)))
    with torch.no_grad():
        out = torch_model.generate(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
            do_sample=False, max_new_tokens=R, eos_token_id=eos, pad_token_id=0,
        )[:, ids.shape[1]:].numpy()
    theirs = np.pad(out, ((0, 0), (0, R - out.shape[1])))  # transformers stops when all rows do
    np.testing.assert_array_equal(ours.tokens, theirs)
    stopped = (theirs == eos).any(axis=1)
    assert 0 < stopped.sum() < len(ids)  # some rows stop early on EOS, some run to R
    np.testing.assert_array_equal(ours.ended_with_stop, stopped)
    first_eos = np.where(stopped, np.argmax(theirs == eos, axis=1) + 1, R)
    np.testing.assert_array_equal(ours.lengths, first_eos)
    np.testing.assert_array_equal(ours.response_mask, np.arange(R)[None] < first_eos[:, None])
    # A row that stopped does not disturb the others: they match the run without a stop token.
    np.testing.assert_array_equal(ours.tokens[~stopped], free.tokens[~stopped])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logprobs_equal_full_forward_log_softmax(family):
    cfg = tiny_config(family, vocab_size=97)
    model, params = models.init_model(cfg)
    params = wide(params)
    ids, mask = padded_batch((7, 3, 5, 1, 8, 2), 8)
    temperature = 0.7
    ro = run(model, params, ids, mask, seed=3, temperature=temperature, top_k=20, top_p=0.9,
             stop_token_ids=(5, 6, 7, 8))
    logits = model.apply({"params": params}, jnp.asarray(ro.input_ids),
                         jnp.asarray(ro.attention_mask))
    p = ids.shape[1]
    logp = jax.nn.log_softmax(np.asarray(logits)[:, p - 1:-1] / temperature, axis=-1)
    expected = np.take_along_axis(np.asarray(logp), ro.tokens[..., None], axis=-1)[..., 0]
    real = ro.response_mask.astype(bool)
    np.testing.assert_allclose(ro.logprobs[real], expected[real], atol=1e-4, rtol=0)
    assert (ro.logprobs[~real] == 0).all() and (ro.tokens[~real] == cfg.pad_token_id).all()
    assert ro.ended_with_stop.any() and np.ptp(ro.logprobs[real]) > 0.1  # a test that can fail


# --- sampling filters: numpy references from the definitions, then the sampled distribution.

LOGITS = np.array([2.0, 1.5, 1.2, 1.0, 0.3, 0.0, -0.5, -1.0, -2.0, -3.0], np.float32)


def allowed_top_k(logits, k):
    return set(np.argsort(-logits)[:k].tolist())


def allowed_top_p(logits, p):
    """Smallest set of most likely tokens whose probability reaches p."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    n = int(np.searchsorted(np.cumsum(probs[order]), p - 1e-7)) + 1
    return set(order[:n].tolist())


def chi_square_pvalue(samples, logits, allowed):
    allowed = sorted(allowed)
    logits = logits.astype(np.float64)
    probs = np.exp(logits[allowed] - logits[allowed].max())
    probs /= probs.sum()
    counts = np.array([(samples == t).sum() for t in allowed])
    return stats.chisquare(counts, probs * len(samples)).pvalue


@pytest.mark.parametrize("top_k,top_p", [(4, 1.0), (0, 0.5), (0, 0.85), (6, 0.8), (0, 1.0)])
def test_filters_keep_the_right_tokens_and_sample_the_renormalised_distribution(top_k, top_p):
    allowed = set(range(len(LOGITS)))
    if top_k:
        allowed &= allowed_top_k(LOGITS, top_k)
    if top_p < 1:
        sub = np.where(np.isin(np.arange(len(LOGITS)), sorted(allowed)), LOGITS, -np.inf)
        allowed &= allowed_top_p(sub, top_p)
    filtered = gen.top_p_filter(gen.top_k_filter(jnp.asarray(LOGITS)[None], top_k), top_p)[0]
    assert set(np.flatnonzero(np.isfinite(np.asarray(filtered))).tolist()) == allowed
    n = 40_000
    samples = np.asarray(gen.sampled_token(jnp.broadcast_to(filtered, (n, len(LOGITS))),
                                           jax.random.key(7)))
    assert set(np.unique(samples).tolist()) == allowed  # only allowed tokens, and all of them
    assert chi_square_pvalue(samples, LOGITS, allowed) > 1e-3
    # The test can tell: the unfiltered distribution is rejected whenever something was cut.
    if len(allowed) < len(LOGITS):
        unfiltered = np.asarray(gen.sampled_token(jnp.broadcast_to(jnp.asarray(LOGITS), (n, 10)),
                                                  jax.random.key(7)))
        assert not set(np.unique(unfiltered).tolist()) <= allowed


def test_top_k_one_is_greedy_and_keys_decide_the_samples():
    model, params = models.init_model(tiny_config("qwen2", vocab_size=97))
    params = wide(params)
    ids, mask = padded_batch((7, 3, 5, 8), 8)
    greedy = run(model, params, ids, mask, greedy=True, stop_at_eos=False)
    top1 = run(model, params, ids, mask, seed=5, top_k=1, stop_at_eos=False)
    np.testing.assert_array_equal(top1.tokens, greedy.tokens)
    a = run(model, params, ids, mask, seed=1, stop_at_eos=False)
    b = run(model, params, ids, mask, seed=1, stop_at_eos=False)
    c = run(model, params, ids, mask, seed=2, stop_at_eos=False)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).mean() > 0.3


def test_loop_stops_as_soon_as_every_row_has_stopped():
    model, params = models.init_model(tiny_config("gpt2", vocab_size=97))
    params = wide(params)
    ids, mask = padded_batch((7, 3, 5, 8), 8)
    free = run(model, params, ids, mask, max_new_tokens=16, greedy=True, stop_at_eos=False)
    assert int(free.num_steps) == 16
    stops = tuple(sorted(set(free.tokens[:, 2].tolist())))  # every row meets one by step 2
    ro = run(model, params, ids, mask, max_new_tokens=16, greedy=True, stop_at_eos=False,
             stop_token_ids=stops)
    first = np.argmax(np.isin(free.tokens, stops), axis=1) + 1
    assert int(ro.num_steps) == first.max() <= 3
    np.testing.assert_array_equal(ro.lengths, first)
    assert ro.ended_with_stop.all()
    real = ro.response_mask.astype(bool)
    np.testing.assert_array_equal(ro.tokens[real], free.tokens[real])


def test_one_compilation_per_bucket_and_padding_does_not_change_outputs():
    model, params = models.init_model(tiny_config("llama", vocab_size=97))
    params = wide(params)
    cfg = gen.SamplingConfig(max_new_tokens=6, greedy=True, stop_at_eos=False, prompt_bucket=8)
    fn = gen.make_generate_fn(model, cfg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 97, n).tolist() for n in (5, 2, 7, 4)]
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration" and kw.get("fun_name") in ("generate", "jit(generate)"):
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outs = []
        for batch in (prompts[:2], prompts[2:], [prompts[0], [9] * 9]):  # widths 8, 8, 16
            ids, mask = gen.pad_prompts(batch, cfg.prompt_bucket, pad_id=0)
            outs.append(jax.device_get(fn(params, ids, mask, jax.random.key(0))))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [o.prompt_ids.shape[1] for o in outs] == [8, 8, 16]
    assert len(compiles) == 2  # widths 8 and 16: the second batch of width 8 reused the first
    # prompts[0] padded to 8 and to 16, and right-padded, gives the same tokens
    np.testing.assert_array_equal(outs[0].tokens[0], outs[2].tokens[0])
    right = np.zeros((1, 8), np.int32)
    right[0, :5] = prompts[0]
    ro = fn(params, right, (right != 0).astype(np.int32), jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(ro.tokens)[0], outs[0].tokens[0])


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_generation_equals_one_device(shape):
    cfg = tiny_config("llama", vocab_size=128)
    model, params = models.init_model(cfg, seed=1)
    ids, mask = padded_batch((7, 3, 5, 1, 8, 2, 6, 4), 8, vocab=128)
    sampling = dict(temperature=1.0, top_k=40, stop_token_ids=(3, 4, 5))
    ref = run(model, params, ids, mask, seed=4, **sampling)
    mesh = shd.make_mesh(shape)
    _, sharded_params = models.init_model(cfg, seed=1, mesh=mesh)
    fn = gen.make_generate_fn(model, gen.SamplingConfig(max_new_tokens=R, **sampling))
    with shd.use_mesh(mesh):
        out = fn(sharded_params, shd.shard_batch(ids, mesh), shd.shard_batch(mask, mesh),
                 jax.random.key(4))
    assert out.tokens.sharding.spec[0] in (("data", "fsdp"), "data")  # rows stay split
    out = jax.device_get(out)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    assert len(np.unique(ref.tokens)) > 10 and ref.ended_with_stop.any()


def test_prompt_helpers_bucket_truncate_and_explain():
    assert [gen.bucket_width(n, 0) for n in (1, 8, 9, 100)] == [8, 8, 16, 128]
    assert [gen.bucket_width(n, 32) for n in (1, 32, 33)] == [32, 32, 64]
    ids, mask = gen.pad_prompts([[5, 6, 7], [8]], 4, pad_id=0, batch_size=3)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]])

    class Tok:  # one id per character
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

    cfg = gen.SamplingConfig(max_new_tokens=4)
    assert gen.encode_prompts(Tok(), ["abcdef"], cfg, 8, truncate=True) == [[99, 100, 101, 102]]
    with pytest.raises(ValueError, match=r"prompt 2 has 6 tokens .* leave 4; .*--truncate"):
        gen.encode_prompts(Tok(), ["ab", "abcdef"], cfg, 8)


def test_scanned_and_unrolled_layers_give_the_same_rollout(hf_checkpoint):
    """`rlhf-jax generate` loads unrolled layers (no stacking on load, no slicing per call);
    the rollout is the one of the scanned model."""
    path, _ = hf_checkpoint("qwen2")
    ids, mask = padded_batch((7, 3, 5, 1), 8)
    outs = []
    for scan in (True, False):
        model, params = models.load_hf(path, scan_layers=scan)
        outs.append(run(model, wide(params), ids, mask, seed=2, top_k=20, stop_at_eos=False))
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_allclose(outs[0].logprobs, outs[1].logprobs, atol=1e-5)
    assert len(np.unique(outs[0].tokens)) > 8
