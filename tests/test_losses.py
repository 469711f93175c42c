"""Loss functions against numpy written from the papers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses

RNG = np.random.default_rng(1)


def test_bradley_terry_loss_and_gradient_match_numpy():
    c = RNG.normal(size=64).astype(np.float32)
    r = RNG.normal(size=64).astype(np.float32)
    m = RNG.uniform(0, 1, size=64).astype(np.float32)
    for margin in (None, m):
        d = c - r - (0 if margin is None else margin)
        ref = np.log1p(np.exp(-d))  # −log σ(d)
        got = losses.bradley_terry_loss(c, r, margin)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
        g = jax.grad(lambda x: jnp.sum(losses.bradley_terry_loss(x, r, margin)))(c)
        np.testing.assert_allclose(np.asarray(g), -1 / (1 + np.exp(d)), rtol=1e-5, atol=1e-6)


def ppo_reference(lp, old, a, mask, eps, dual):
    total, clipped_count = 0.0, 0
    for x, o, adv, m in zip(lp.ravel(), old.ravel(), a.ravel(), mask.ravel()):
        if not m:
            continue
        ratio = np.exp(x - o)
        l1, l2 = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
        loss = max(l1, l2)
        if dual is not None and adv < 0:
            loss = min(loss, -dual * adv)
        total += loss
        clipped_count += l2 > l1
    return total, clipped_count


@pytest.mark.parametrize("dual", [None, 3.0])
def test_policy_loss_matches_loop(dual):
    shape = (5, 9)
    lp = RNG.normal(-1, 0.5, shape).astype(np.float32)
    old = (lp + RNG.normal(0, 0.4, shape)).astype(np.float32)
    a = RNG.normal(0, 2, shape).astype(np.float32)
    mask = (RNG.uniform(size=shape) < 0.7).astype(np.float32)
    loss, count, metrics = jax.jit(losses.policy_loss, static_argnums=(4, 5))(lp, old, a, mask, 0.2, dual)
    ref, ref_clipped = ppo_reference(lp, old, a, mask, 0.2, dual)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert float(count) == mask.sum() and float(metrics["clipfrac"]) == ref_clipped
    np.testing.assert_allclose(float(metrics["approx_kl"]), (0.5 * (lp - old) ** 2 * mask).sum(), rtol=1e-5)


def test_policy_gradient_is_zero_where_clipped():
    old = np.zeros(4, np.float32)
    lp = np.log(np.array([1.5, 0.5, 1.05, 0.95], np.float32))  # ratios
    a = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
    g = jax.grad(lambda x: losses.policy_loss(x, old, a, np.ones(4), 0.2)[0])(lp)
    # ratio 1.5 with A>0 and 0.5 with A<0 are clipped: no gradient; the others get −A·ρ
    np.testing.assert_allclose(np.asarray(g), [0.0, 0.0, -1.05, 0.95], atol=1e-6)


def test_value_loss_clipped_and_unclipped():
    v = np.array([1.0, 0.0, 2.0, -1.0], np.float32)
    old = np.array([0.0, 0.0, 1.5, 0.0], np.float32)
    ret = np.array([2.0, 1.0, 0.0, -3.0], np.float32)
    mask = np.array([1, 1, 1, 0], np.float32)
    loss, count, m = losses.value_loss(v, old, ret, mask, 0.2)
    clipped_v = old + np.clip(v - old, -0.2, 0.2)
    per = np.maximum((v - ret) ** 2, (clipped_v - ret) ** 2)
    np.testing.assert_allclose(float(loss), 0.5 * (per * mask).sum(), rtol=1e-6)
    assert float(count) == 3
    assert float(m["vf_clipfrac"]) == (((clipped_v - ret) ** 2 > (v - ret) ** 2) * mask).sum()
    loss_u, _, _ = losses.value_loss(v, old, ret, mask, None)
    np.testing.assert_allclose(float(loss_u), 0.5 * (((v - ret) ** 2) * mask).sum(), rtol=1e-6)


def test_entropy_matches_numpy():
    logits = RNG.normal(size=(2, 3, 11)).astype(np.float32) * 3
    mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ref = (-(p * np.log(p)).sum(-1) * mask).sum()
    np.testing.assert_allclose(float(losses.entropy_sum(logits, mask)), ref, rtol=1e-5)
