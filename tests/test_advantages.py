"""rlhf_jax/advantages.py against plain numpy loops written from the papers, under jit.

Masks are ragged: a full row, an empty row and rows of other lengths; positions past each
response hold garbage (huge numbers and NaN) that must never change a result.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LENGTHS, normal, response_mask, with_garbage
from rlhf_jax.rl import advantages as adv

B, T = len(LENGTHS), 9
TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Masked statistics.


def test_masked_statistics_are_over_real_tokens_only():
    mask = response_mask()
    x = normal(B, T, seed=1, loc=2.0, scale=3.0)
    xg = with_garbage(x, mask)
    real = x[mask > 0].astype(np.float64)
    jit = jax.jit(adv.masked_sum, static_argnums=2)
    np.testing.assert_allclose(jit(xg, mask, None), real.sum(), **TOL)
    row_sums = [x[b, :n].sum() for b, n in enumerate(LENGTHS)]
    np.testing.assert_allclose(jit(xg, mask, 1), row_sums, **TOL)

    mean = jax.jit(adv.masked_mean, static_argnums=2)
    np.testing.assert_allclose(mean(xg, mask, None), real.mean(), **TOL)
    row_means = [x[b, :n].mean() if n else 0.0 for b, n in enumerate(LENGTHS)]  # empty row → 0
    np.testing.assert_allclose(mean(xg, mask, 1), row_means, **TOL)

    var = jax.jit(adv.masked_var, static_argnums=2)
    np.testing.assert_allclose(var(xg, mask, True), real.var(ddof=1), **TOL)
    np.testing.assert_allclose(var(xg, mask, False), real.var(ddof=0), **TOL)


def test_masked_whiten_uses_the_batch_statistics_of_real_tokens():
    mask = response_mask()
    x = normal(B, T, seed=2, loc=-1.0, scale=4.0)
    real = x[mask > 0].astype(np.float64)
    mu, var = real.mean(), real.var(ddof=1)
    whiten = jax.jit(adv.masked_whiten, static_argnums=2)
    white = np.asarray(whiten(with_garbage(x, mask), mask, True))
    np.testing.assert_allclose(white, np.where(mask > 0, (x - mu) / np.sqrt(var + 1e-8), 0), **TOL)
    np.testing.assert_allclose(white[mask > 0].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(white[mask > 0].std(ddof=1), 1.0, **TOL)
    scaled = np.asarray(whiten(with_garbage(x, mask), mask, False))
    np.testing.assert_allclose(scaled, np.where(mask > 0, (x - mu) / np.sqrt(var + 1e-8) + mu, 0),
                               **TOL)


def test_statistics_of_one_or_no_real_token_are_finite():
    x = normal(2, 3, seed=3)
    one = np.array([[0, 1, 0], [0, 0, 0]], np.float32)
    assert float(adv.masked_var(x, one)) == 0.0  # n = 1: no division by n − 1 = 0
    none = np.zeros((2, 3), np.float32)
    assert float(adv.masked_mean(x, none)) == 0.0 and float(adv.masked_var(x, none)) == 0.0
    assert np.all(np.asarray(adv.masked_whiten(x, none)) == 0.0)


# ---------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence").


def kl_reference(logp, ref, estimator):
    """Per token, from the note: r = p_ref(x) / p(x), x ~ p."""
    r = np.exp(ref.astype(np.float64) - logp.astype(np.float64))
    return {"k1": -np.log(r), "k2": 0.5 * np.log(r) ** 2,
            "k3": (r - 1) - np.log(r), "abs": np.abs(np.log(r))}[estimator]


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_kl_estimators_match_the_note_and_the_nonnegative_ones_are(estimator):
    logp = normal(64, 33, seed=4, loc=-3.0, scale=2.0)
    ref = normal(64, 33, seed=5, loc=-3.0, scale=2.0)
    kl = jax.jit(adv.per_token_kl, static_argnums=2)
    got = np.asarray(kl(logp, ref, adv.KLEstimator(estimator)))
    np.testing.assert_allclose(got, kl_reference(logp, ref, estimator), **TOL)
    if estimator != "k1":
        assert (got >= 0).all()


def test_k1_and_k3_are_unbiased_estimates_of_the_exact_kl():
    # Sampled tokens x ~ p of a categorical: the mean of k1 and k3 over samples → KL(p‖q).
    # 400k samples put the Monte-Carlo standard error near 1e-3, hence atol=5e-3 here.
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(8))
    q = rng.dirichlet(np.ones(8))
    exact = float(np.sum(p * np.log(p / q)))
    x = rng.choice(8, size=400_000, p=p)
    logp, ref = np.log(p[x]).astype(np.float32), np.log(q[x]).astype(np.float32)
    for estimator in ("k1", "k3"):
        est = float(jnp.mean(adv.per_token_kl(logp, ref, estimator)))
        np.testing.assert_allclose(est, exact, atol=5e-3, err_msg=estimator)


# ---------------------------------------------------------------------------------------------
# Scores and reward shaping.


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_shape_rewards_puts_the_score_on_the_last_token_and_kl_on_every_token(estimator):
    mask = response_mask()
    logp = normal(B, T, seed=7, loc=-2.0)
    ref = normal(B, T, seed=8, loc=-2.0)
    scores = normal(B, seed=9)
    beta = 0.07
    shape = jax.jit(adv.shape_rewards, static_argnums=5)
    rewards, stats = shape(scores, with_garbage(logp, mask), with_garbage(ref, mask, 1), mask,
                           jnp.float32(beta), adv.KLEstimator(estimator))
    expected = np.zeros((B, T))
    kl_sum = np.zeros(B)
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            kl = kl_reference(logp[b, t], ref[b, t], estimator)
            expected[b, t] = -beta * kl
            kl_sum[b] += kl
        if n:
            expected[b, n - 1] += scores[b]
    np.testing.assert_allclose(np.asarray(rewards), expected, **TOL)
    np.testing.assert_allclose(np.asarray(stats["kl"]), kl_sum, **TOL)
    np.testing.assert_allclose(np.asarray(stats["non_score_reward"]), -beta * kl_sum, **TOL)


def test_eos_penalty_and_clipping():
    scores = np.array([1.0, 2.0, -3.0, 0.5], np.float32)
    has_stop = np.array([True, False, False, True])
    out = jax.jit(adv.score_with_eos_penalty)(scores, has_stop, 1.5)
    np.testing.assert_allclose(np.asarray(out), [1.0, 0.5, -4.5, 0.5])
    np.testing.assert_allclose(np.asarray(adv.clip_rewards(scores, 1.0)), [1.0, 1.0, -1.0, 0.5])
    assert adv.clip_rewards(scores, None) is scores


# ---------------------------------------------------------------------------------------------
# GAE (Schulman et al. 2015).


def gae_reference(rewards, values, lengths, gamma, lam):
    """Per row, backward over its n real tokens; the episode ends after token n − 1."""
    advantages = np.zeros(rewards.shape)
    for b, n in enumerate(lengths):
        next_adv = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            advantages[b, t] = next_adv
    returns = np.where(response_mask(lengths, rewards.shape[1]) > 0, advantages + values, 0.0)
    return advantages, returns


GAE = jax.jit(adv.gae)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.5, 1.0), (1.0, 0.0)])
def test_gae_matches_a_backward_loop_per_row(gamma, lam):
    mask = response_mask()
    rewards = normal(B, T, seed=11)
    values = normal(B, T, seed=12)
    a, r = GAE(with_garbage(rewards, mask), with_garbage(values, mask, 1), mask, gamma, lam)
    ref_a, ref_r = gae_reference(rewards, values, LENGTHS, gamma, lam)
    np.testing.assert_allclose(np.asarray(a), ref_a, **TOL)
    np.testing.assert_allclose(np.asarray(r), ref_r, **TOL)


def test_gae_ignores_whatever_sits_in_the_padding():
    mask = response_mask()
    rewards = normal(B, T, seed=13)
    values = normal(B, T, seed=14)
    clean = GAE(rewards * mask, values * mask, mask, 0.99, 0.95)
    for seed in (1, 2):
        dirty = GAE(with_garbage(rewards, mask, seed), with_garbage(values, mask, seed + 10),
                    mask, 0.99, 0.95)
        for x, y in zip(clean, dirty):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_gae_with_lambda_one_returns_the_discounted_reward_to_go():
    # λ = 1: A_t = Σ_l γ^l r_{t+l} − V_t, so the value target is the Monte-Carlo return.
    mask = response_mask()
    rewards = normal(B, T, seed=15)
    _, returns = GAE(rewards, normal(B, T, seed=16), mask, 0.9, 1.0)
    expected = np.zeros((B, T))
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            expected[b, t] = sum(0.9 ** (k - t) * rewards[b, k] for k in range(t, n))
    np.testing.assert_allclose(np.asarray(returns), expected, **TOL)


def test_gae_passes_over_holes_in_the_mask():
    # Masked positions are not time steps: the result equals GAE on the real tokens alone.
    mask = np.array([[1, 0, 1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 0, 0, 1, 0]], np.float32)
    rewards = normal(2, 8, seed=17)
    values = normal(2, 8, seed=18)
    a, r = GAE(with_garbage(rewards, mask), with_garbage(values, mask), mask, 0.95, 0.9)
    for b in range(2):
        idx = np.flatnonzero(mask[b])
        ref_a, ref_r = gae_reference(rewards[b, idx][None], values[b, idx][None], [len(idx)],
                                     0.95, 0.9)
        np.testing.assert_allclose(np.asarray(a)[b, idx], ref_a[0], **TOL)
        np.testing.assert_allclose(np.asarray(r)[b, idx], ref_r[0], **TOL)
        assert np.all(np.asarray(a)[b, mask[b] == 0] == 0)


# ---------------------------------------------------------------------------------------------
# KL controllers (Ziegler et al. 2019).


def test_adaptive_kl_controller_follows_ziegler_over_several_updates():
    target, horizon, n_steps = 6.0, 1000.0, 64
    update = jax.jit(functools.partial(adv.update_kl_controller, control="adaptive",
                                       target=target, horizon=horizon))
    state = adv.init_kl_controller(0.2)
    coef = 0.2
    # below, inside and above the ±20 % band, and a batch with no KL at all
    for kl in [1.0, 5.0, 6.5, 7.1, 12.0, 20.0, 0.0, 6.0]:
        state = update(state, jnp.float32(kl), n_steps)
        error = min(max(kl / target - 1.0, -0.2), 0.2)
        coef = coef * (1.0 + error * n_steps / horizon)
        np.testing.assert_allclose(float(state.coef), coef, rtol=1e-6)
    assert jax.tree_util.tree_leaves(state) == [state.coef]  # all a checkpoint needs


def test_fixed_kl_controller_keeps_its_coefficient():
    update = jax.jit(functools.partial(adv.update_kl_controller, control=adv.KLControl.FIXED,
                                       target=6.0, horizon=1000.0))
    state = adv.init_kl_controller(0.05)
    for kl in [0.0, 50.0, 3.0]:
        state = update(state, jnp.float32(kl), 64)
    assert float(state.coef) == np.float32(0.05)
