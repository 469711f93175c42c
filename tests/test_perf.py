"""Machine ceilings: measured rates are sane, and the decode byte count matches a hand count."""

import math

import pytest

from rlhf_jax import perf
from rlhf_jax.world.tiny import tiny_config


def test_measured_rates_are_positive_and_finite():
    flops = perf.matmul_flops_per_s(64, 128, 128, repeats=3)
    best = perf.matmul_ceiling([(8, 64, 64), (64, 128, 128)], repeats=3)
    bw = perf.memory_bandwidth_bytes_per_s(nbytes=8 << 20, repeats=3)
    for x in (flops, best, bw):
        assert math.isfinite(x) and x > 0
    times = perf.timeit(lambda: sum(range(100)), repeats=4)
    assert len(times) == 4 and all(t >= 0 for t in times)
    s = perf.summary([1.0, 2.0, 4.0])
    assert s["median"] == 2.0 and s["spread"] == pytest.approx(1.5) and s["n"] == 3


def test_decode_bytes_and_ceiling_equal_a_hand_count():
    # tiny gpt2: L=2, D=64, H=K=4, Dh=16, F=128, V=512, tied embeddings.
    cfg = tiny_config("gpt2")
    weights = 2 * (4 * 64 * 64 + 2 * 64 * 128) + 512 * 64  # q k v o + fc down per layer, LM head
    kv = 2 * 2 * 3 * 4 * 10 * 16  # k and v, 2 layers, batch 3, 4 heads, 10 tokens, Dh 16
    assert perf.decode_bytes_per_step(cfg, batch=3, context_len=10, dtype_bytes=4) == (weights + kv) * 4
    # llama: K=2 kv heads, three MLP matrices, untied LM head (the embedding is only looked up).
    llama = tiny_config("llama")
    weights = 2 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128) + 512 * 64
    kv = 2 * 2 * 1 * 2 * 7 * 16
    assert perf.decode_bytes_per_step(llama, batch=1, context_len=7, dtype_bytes=2) == (weights + kv) * 2

    # Memory bound: 1 byte/s reads one step of 3 tokens in `bytes` seconds.
    nbytes = perf.decode_bytes_per_step(cfg, 3, 10)
    memory_only = perf.decode_ceiling_tokens_per_s(cfg, 3, 10, flops_per_s=1e30, bytes_per_s=1.0)
    assert memory_only == pytest.approx(3 / nbytes)
    b = perf.decode_bounds(cfg, 3, 10, flops_per_s=1.0, bytes_per_s=1e30)
    assert b["bound"] == "compute" and b["tokens_per_s"] == pytest.approx(b["compute"])


def test_environment_names_the_machine():
    env = perf.environment()
    assert env["cpu_count"] >= 1 and env["jax"] and env["device_kind"]
    assert perf.device_label().startswith("cpu-")
