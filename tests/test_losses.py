"""rlhf_jax/losses.py against numpy written from the papers, under jit.

The PPO references use the objective as Schulman et al. 2017 write it (maximise
min(ρA, clip(ρ)A)) and per-token loops in float64; the code minimises its negation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import LENGTHS, normal, response_mask, with_garbage
from rlhf_jax.rl import losses as L

B, T, V = len(LENGTHS), 9, 11
TOL = dict(rtol=1e-5, atol=1e-5)


def test_bradley_terry_loss_and_gradient_match_numpy():
    rng = np.random.default_rng(1)
    c = rng.normal(size=64).astype(np.float32)
    r = rng.normal(size=64).astype(np.float32)
    m = rng.uniform(0, 1, size=64).astype(np.float32)
    for margin in (None, m):
        d = c - r - (0 if margin is None else margin)
        ref = np.log1p(np.exp(-d))  # −log σ(d)
        got = L.bradley_terry_loss(c, r, margin)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
        g = jax.grad(lambda x: jnp.sum(L.bradley_terry_loss(x, r, margin)))(c)
        np.testing.assert_allclose(np.asarray(g), -1 / (1 + np.exp(d)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Clipped surrogate.


def policy_reference(logp, old, adv, mask, eps, dual):
    """Σ over real tokens of −min(ρA, clip(ρ, 1−ε, 1+ε)A) (and max(·, cA) for A < 0)."""
    out = dict(loss=0.0, count=0, clipfrac=0, dual_clipfrac=0, approx_kl=0.0, approx_kl_k3=0.0,
               ratio=0.0)
    for x, o, a, m in zip(logp.ravel(), old.ravel(), adv.ravel(), mask.ravel()):
        if not m:
            continue
        x, o, a = float(x), float(o), float(a)
        rho = np.exp(x - o)
        surr1, surr2 = rho * a, np.clip(rho, 1 - eps, 1 + eps) * a
        objective = min(surr1, surr2)
        out["clipfrac"] += surr2 < surr1
        if dual is not None and a < 0 and dual * a > objective:
            objective = dual * a
            out["dual_clipfrac"] += 1
        out["loss"] -= objective
        out["count"] += 1
        out["approx_kl"] += 0.5 * (x - o) ** 2
        out["approx_kl_k3"] += (rho - 1) - (x - o)
        out["ratio"] += rho
    return out


@pytest.mark.parametrize("dual_clip", [None, 2.0])
def test_policy_loss_matches_the_clipped_objective(dual_clip):
    mask = response_mask()
    old = normal(B, T, seed=1, loc=-2.0)
    logp = old + normal(B, T, seed=2, scale=0.5)  # ρ spread well past 1 ± ε
    adv = normal(B, T, seed=3, scale=2.0)
    fn = jax.jit(L.policy_loss, static_argnums=(4, 5))
    loss, count, metrics = fn(with_garbage(logp, mask), with_garbage(old, mask, 1),
                              with_garbage(adv, mask, 2), mask, 0.2, dual_clip)
    ref = policy_reference(logp, old, adv, mask, 0.2, dual_clip)
    assert 0 < ref["clipfrac"] < ref["count"]
    assert dual_clip is None or ref["dual_clipfrac"] > 0
    np.testing.assert_allclose(float(loss), ref["loss"], **TOL)
    assert float(count) == ref["count"] == sum(LENGTHS)
    for k, v in metrics.items():
        np.testing.assert_allclose(float(v), ref[k], err_msg=k, **TOL)


def test_kl_estimates_on_ratios_computed_by_hand():
    # ρ = 2, 1/2, e^0.1 on real tokens; the padded token (ρ = e^5) must not count.
    # ½(log ρ)²:      ½(ln²2 + ln²2 + 0.01)                         = 0.485453
    # (ρ − 1) − log ρ: (1 − ln 2) + (−½ + ln 2) + (e^0.1 − 1.1)      = 0.505171
    old = np.full((1, 4), -2.0, np.float32)
    logp = old + np.array([[np.log(2.0), -np.log(2.0), 0.1, 5.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    _, count, metrics = L.policy_loss(logp, old, np.ones((1, 4), np.float32), mask, 0.2)
    assert float(count) == 3
    np.testing.assert_allclose(float(metrics["approx_kl"]), 0.485453, atol=1e-6)
    np.testing.assert_allclose(float(metrics["approx_kl_k3"]), 0.505171, atol=1e-6)
    np.testing.assert_allclose(float(metrics["ratio"]), 3.605171, atol=1e-6)


EPS, DUAL = 0.2, 3.0
# (advantage, ratio, real, case): what the objective picks at each token, by construction.
TOKENS = [
    (1.0, 1.5, 1, "clip"),     # A > 0, ρ > 1 + ε: clip(ρ)A = 1.2 < 1.5
    (1.0, 0.5, 1, "free"),     # A > 0, ρ < 1 − ε: ρA smaller, no clip
    (-1.0, 0.5, 1, "clip"),    # A < 0, ρ < 1 − ε: clip(ρ)A = −0.8 < −0.5
    (-1.0, 1.5, 1, "free"),    # A < 0, ρ > 1 + ε: ρA = −1.5 smaller, no clip (dual: −3 < −1.5)
    (-1.0, 4.0, 1, "dual"),    # A < 0, ρ > c: ρA = −4 < cA = −3, the dual bound applies
    (2.0, 1.05, 1, "free"),    # inside the trust region
    (-0.5, 0.9, 1, "free"),    # inside the trust region
    (0.0, 1.5, 1, "zero"),     # A = 0: no gradient, not counted
    (1.0, 1.5, 0, "pad"),      # would be clipped, but padding
    (-1.0, 4.0, 0, "pad"),     # would be dual-clipped, but padding
]


def constructed_batch():
    adv, rho, real, case = (np.array(c) for c in zip(*TOKENS))
    old = np.linspace(-3.0, -1.0, len(TOKENS)).astype(np.float32)
    logp = (old + np.log(rho)).astype(np.float32)
    return logp[None], old[None], adv[None].astype(np.float32), real[None].astype(np.float32), case


@pytest.mark.parametrize("dual_clip", [None, DUAL])
def test_clip_fractions_count_exactly_the_clipped_tokens(dual_clip):
    logp, old, adv, mask, case = constructed_batch()
    _, count, metrics = jax.jit(L.policy_loss, static_argnums=(4, 5))(
        logp, old, adv, mask, EPS, dual_clip)
    assert float(count) == 8
    assert float(metrics["clipfrac"]) == np.sum(case == "clip") == 2
    assert float(metrics["dual_clipfrac"]) == (1 if dual_clip else 0)


def policy_loss_float64(logp, old, adv, mask, dual):
    return policy_reference(logp, old, adv, mask, EPS, dual)["loss"]


@pytest.mark.parametrize("dual_clip", [None, DUAL])
def test_policy_gradient_is_zero_where_clipped_and_matches_finite_differences(dual_clip):
    logp, old, adv, mask, case = constructed_batch()
    grad = jax.jit(jax.grad(lambda x: L.policy_loss(x, old, adv, mask, EPS, dual_clip)[0]))
    g = np.asarray(grad(logp))[0]
    bounded = (case == "clip") | (case == "pad") | (case == "zero")
    if dual_clip:
        bounded |= case == "dual"
    assert np.all(g[bounded] == 0.0)
    assert np.all(g[~bounded] != 0.0)
    # Central differences of the float64 reference, away from every kink (|ρ − kink| ≥ 0.05).
    x64, h = logp.astype(np.float64), 1e-6
    for t in range(len(TOKENS)):
        up, down = x64.copy(), x64.copy()
        up[0, t] += h
        down[0, t] -= h
        fd = (policy_loss_float64(up, old, adv, mask, dual_clip)
              - policy_loss_float64(down, old, adv, mask, dual_clip)) / (2 * h)
        np.testing.assert_allclose(g[t], fd, err_msg=str(TOKENS[t]), **TOL)
    # NaN at padding reaches neither the loss nor the gradient.
    nan_pad = lambda x: np.where(mask > 0, x, np.nan).astype(np.float32)  # noqa: E731
    g_nan = jax.grad(lambda x: L.policy_loss(x, nan_pad(old), nan_pad(adv), mask, EPS,
                                             dual_clip)[0])(nan_pad(logp))
    np.testing.assert_array_equal(np.asarray(g_nan)[0], g)


# ---------------------------------------------------------------------------------------------
# Value loss.


def value_reference(values, old, returns, mask, eps):
    loss, count, clipped_count = 0.0, 0, 0
    for v, o, r, m in zip(values.ravel(), old.ravel(), returns.ravel(), mask.ravel()):
        if not m:
            continue
        v, o, r = float(v), float(o), float(r)
        err = (v - r) ** 2
        if eps is not None:
            err_clipped = (min(max(v, o - eps), o + eps) - r) ** 2
            clipped_count += err_clipped > err
            err = max(err, err_clipped)
        loss += 0.5 * err
        count += 1
    return loss, count, clipped_count


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_matches_the_clipped_value_objective(clip_eps):
    mask = response_mask()
    old = normal(B, T, seed=4)
    values = old + normal(B, T, seed=5, scale=0.4)
    returns = normal(B, T, seed=6)
    loss, count, metrics = jax.jit(L.value_loss, static_argnums=4)(
        with_garbage(values, mask), with_garbage(old, mask, 1), with_garbage(returns, mask, 2),
        mask, clip_eps)
    ref_loss, ref_count, ref_clipped = value_reference(values, old, returns, mask, clip_eps)
    assert clip_eps is None or 0 < ref_clipped < ref_count
    np.testing.assert_allclose(float(loss), ref_loss, **TOL)
    assert float(count) == ref_count
    assert float(metrics["vf_clipfrac"]) == ref_clipped


def test_value_clip_fraction_and_gradient_on_constructed_values():
    # (V, V_old, R, real): ε = 0.2, so clip(V) ∈ [V_old − 0.2, V_old + 0.2]
    cases = np.array([
        [1.5, 1.0, 0.0, 1],  # (1.5)² = 2.25 > (1.2)² = 1.44: unclipped error chosen
        [1.5, 1.0, 3.0, 1],  # (1.2 − 3)² = 3.24 > (1.5 − 3)² = 2.25: clipped chosen
        [0.5, 1.0, 0.0, 1],  # (0.8)² = 0.64 > (0.5)² = 0.25: clipped chosen
        [1.1, 1.0, 0.0, 1],  # inside the clip range: equal, not counted
        [0.5, 1.0, 0.0, 0],  # padding
    ], np.float32).T[:, None, :]
    values, old, returns, mask = cases
    fn = functools.partial(L.value_loss, old_values=old, returns=returns, mask=mask, clip_eps=0.2)
    _, count, metrics = fn(values)
    assert float(count) == 4 and float(metrics["vf_clipfrac"]) == 2
    g = np.asarray(jax.grad(lambda v: fn(v)[0])(values))[0]
    np.testing.assert_allclose(g, [1.5, 0.0, 0.0, 1.1, 0.0], **TOL)  # V − R, or 0 where clipped
    nan_pad = lambda x: np.where(mask > 0, x, np.nan).astype(np.float32)  # noqa: E731
    g_nan = jax.grad(lambda v: L.value_loss(v, nan_pad(old), nan_pad(returns), mask, 0.2)[0])(
        nan_pad(values))
    np.testing.assert_array_equal(np.asarray(g_nan)[0], g)


# ---------------------------------------------------------------------------------------------
# Entropy and log-probabilities from logits.


def softmax64(z):
    z = z.astype(np.float64)
    e = np.exp(z - np.max(z))
    return e / e.sum()


def test_entropy_sum_is_stable_and_matches_numpy():
    mask = response_mask()
    logits = normal(B, T, V, seed=7, scale=30.0)  # exp would overflow in float32 unshifted
    logits[0, 0, :3] = -np.inf  # entries the sampler can never take
    temperature = 0.7
    fn = jax.jit(L.entropy_sum, static_argnums=2)
    total = fn(with_garbage(logits, mask), mask, temperature)
    expected = 0.0
    for b, n in enumerate(LENGTHS):
        for t in range(n):
            p = softmax64(logits[b, t] / temperature)
            expected -= np.sum(p[p > 0] * np.log(p[p > 0]))
    np.testing.assert_allclose(float(total), expected, **TOL)
    g = np.asarray(jax.grad(lambda z: fn(z, mask, temperature))(with_garbage(logits, mask)))
    assert np.isfinite(g).all() and np.all(g[mask == 0] == 0.0)


def test_entropy_of_uniform_logits_is_log_vocabulary():
    total = L.entropy_sum(np.zeros((2, 3, V), np.float32), np.ones((2, 3)))
    np.testing.assert_allclose(float(total) / 6, np.log(V), **TOL)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_logprobs_from_logits_gather_the_tempered_log_softmax(temperature):
    logits = normal(B, T, V, seed=8, scale=4.0)
    tokens = np.random.default_rng(9).integers(0, V, (B, T)).astype(np.int32)
    got = np.asarray(jax.jit(L.logprobs_from_logits, static_argnums=2)(logits, tokens, temperature))
    expected = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            expected[b, t] = np.log(softmax64(logits[b, t] / temperature)[tokens[b, t]])
    np.testing.assert_allclose(got, expected, **TOL)
    assert got.dtype == np.float32


def test_logprobs_gradient_is_onehot_minus_softmax():
    # The hand-written backward of logprobs_from_logits against numpy: for a weighted sum
    # Σ w·log π(y), d/dz = w·(onehot(y) − softmax(z/τ))/τ at each position.
    logits = normal(B, T, V, seed=13, scale=4.0)
    tokens = np.random.default_rng(14).integers(0, V, (B, T)).astype(np.int32)
    w = normal(B, T, seed=15)
    tau = 0.8
    grad = np.asarray(jax.jit(jax.grad(
        lambda z: jnp.sum(w * L.logprobs_from_logits(z, tokens, tau))))(logits))
    expected = np.zeros((B, T, V))
    for b in range(B):
        for t in range(T):
            expected[b, t] = -w[b, t] * softmax64(logits[b, t] / tau) / tau
            expected[b, t, tokens[b, t]] += w[b, t] / tau
    np.testing.assert_allclose(grad, expected, **TOL)


def test_first_epoch_ratio_is_one_when_logprobs_come_from_the_same_logits():
    # Training recomputes log π from the same logits and temperature as the rollout: ρ = 1,
    # nothing is clipped and the loss is −Σ A.
    logits = normal(B, T, V, seed=10, scale=3.0)
    tokens = np.random.default_rng(11).integers(0, V, (B, T))
    logp = L.logprobs_from_logits(logits, tokens, 0.7)
    mask = response_mask()
    adv = normal(B, T, seed=12)
    loss, _, metrics = L.policy_loss(logp, logp, adv, mask, 0.2, DUAL)
    np.testing.assert_allclose(float(loss), -float(np.sum(adv * mask)), **TOL)
    assert float(metrics["clipfrac"]) == 0 and float(metrics["ratio"]) == sum(LENGTHS)
