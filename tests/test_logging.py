"""MetricsLogger: JSONL rows, resume without duplicate steps, non-finite values, tables."""

import math
import os

from rlhf_jax.train.logging import MetricsLogger, format_table, read_jsonl


def test_rows_resume_and_non_finite(tmp_path):
    with MetricsLogger(str(tmp_path)) as log:
        for step in range(1, 6):
            log.log(step, {"loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # torn by a hard kill
    # Resumed from the checkpoint at step 3: rows 4, 5 and the torn one go.
    with MetricsLogger(str(tmp_path), resume_step=3) as log:
        log.log(4, {"loss": float("nan"), "kl": float("-inf")})
    rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[2]["loss"] == 1.0 / 3
    assert math.isnan(rows[3]["loss"]) and rows[3]["kl"] == float("-inf")
    assert any(n.startswith("events") for n in os.listdir(tmp_path / "tensorboard"))
    # A fresh run (no resume step) starts a new file.
    with MetricsLogger(str(tmp_path), tensorboard=False) as log:
        log.log(1, {"loss": 2.0})
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "loss": 2.0}]


def test_format_table_escapes_and_cuts():
    table = format_table([{"prompt": "a|b", "response": "x" * 100, "score": 0.123456}], width=10)
    lines = table.splitlines()
    assert lines[0] == "| prompt | response | score |"
    assert lines[2] == "| a\\|b | xxxxxxxxx… | 0.1235 |"
