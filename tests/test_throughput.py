"""Model FLOPs and MFU (rlhf_jax/train/throughput.py) against a count by hand."""

import pytest

from rlhf_jax.train.throughput import (
    Throughput, Work, body_params, forward_flops, generate_flops, training_flops,
)
from rlhf_jax.world.tiny import tiny_config

# Llama family: untied head, no learned positions. D = 8, F = 16, 2 layers, 2 heads of 4,
# 1 kv head, vocabulary 10.
CFG = tiny_config("llama", vocab_size=10, hidden_size=8, num_layers=2, num_heads=2,
                  num_kv_heads=1, intermediate_size=16, max_position_embeddings=32)


def test_body_params_by_hand():
    # per layer: q 8×8, k 8×4, v 8×4, o 8×8 = 192; gate, up, down 3·8·16 = 384 → 576;
    # two layers 1152. The embedding and the untied head (10×8 each) are not body.
    assert body_params(CFG) == 1152


def test_forward_and_training_flops_by_hand():
    # One row of T = 6 tokens: 6·(2·1152 + 4·L·H·Dh·T = 4·2·2·4·6 = 384) = 6·2688 = 16128,
    # plus the LM head 2·V·D = 160 per column of logits.
    assert forward_flops(CFG, 1, 6, 0) == 16128
    assert forward_flops(CFG, 3, 6, 6) == 3 * (16128 + 6 * 160)
    assert forward_flops(CFG, 2, 6, 2) == 2 * (16128 + 2 * 160)
    assert training_flops(CFG, 3, 6, 6) == 3 * forward_flops(CFG, 3, 6, 6)


def test_generate_flops_by_hand():
    # Prefill of 2 rows × 4 tokens (logits at one column): 2·(4·(2304 + 4·16·4) + 160);
    # then decode steps 1 and 2 at contexts 5 and 6: 2·(2304 + 160 + 64·c).
    prefill = 2 * (4 * (2304 + 256) + 160)
    decode = 2 * (2304 + 160 + 64 * 5) + 2 * (2304 + 160 + 64 * 6)
    assert generate_flops(CFG, 2, 4, 3) == prefill + decode


def test_mfu_leaves_out_each_shapes_first_call():
    window = Throughput(ceiling_flops_per_s=100.0)
    window.add(Work(16, 50.0, {"tokens": 10}, slots=16), seconds=9.0)  # compiled
    window.add(Work(16, 50.0, {"tokens": 12}, slots=16), seconds=1.0)
    window.add(Work(32, 80.0, {"tokens": 30}, slots=32), seconds=5.0)  # compiled
    window.add(Work(16, 30.0, {"tokens": 4}, slots=16), seconds=1.0)
    out = window.metrics()
    assert out["perf/mfu"] == pytest.approx(80.0 / 2.0 / 100.0)
    assert out["perf/tokens_per_s"] == pytest.approx(16 / 2.0)
    assert out["perf/fill"] == pytest.approx(16 / 32)
    assert window.metrics() == {}  # the window starts over
