"""MetricsLogger: JSONL rows, resume without duplicate steps, non-finite values, tables."""

import json
import math
import os
import struct

from tensorboardX.proto import event_pb2

from rlhf_jax.train.logging import MetricsLogger, drop_rows_after, format_table, read_jsonl


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


def read_events(path):
    """The events of a TensorBoard file: records of (length u64, crc u32, data, crc u32)."""
    with open(path, "rb") as f:
        data = f.read()
    events, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
        i += 12 + n + 4
    return events


def scalars(tb_dir):
    """{file name: [(tag, step, value), ...]} for every event file in `tb_dir`."""
    return {name: [(v.tag, e.step, round(v.simple_value, 6)) for e in read_events(tb_dir / name)
                   for v in e.summary.value]
            for name in sorted(os.listdir(tb_dir)) if name.startswith("events.out.tfevents")}


def test_a_fresh_run_starts_tensorboard_afresh_and_a_resumed_one_keeps_it(tmp_path):
    tb = tmp_path / "tensorboard"
    tb.mkdir()
    (tb / "events.out.tfevents.1000000000.host").write_bytes(b"an earlier run")
    (tb / "notes.txt").write_text("not ours to delete")
    with MetricsLogger(str(tmp_path)) as log:
        for step in (1, 2, 3):
            log.log(step, {"loss": step / 10})
    first = scalars(tb)
    assert list(first.values()) == [[("loss", 1, 0.1), ("loss", 2, 0.2), ("loss", 3, 0.3)]]
    assert (tb / "notes.txt").read_text() == "not ours to delete"
    # Resumed after step 2 (the same second, even): the first file stays, a second one holds
    # the new rows and tells TensorBoard to hide the old events from step 3 on.
    with MetricsLogger(str(tmp_path), resume_step=2) as log:
        log.log(3, {"loss": 0.35})
    both = scalars(tb)
    assert len(both) == 2 and first.items() <= both.items()
    (resumed,) = [name for name in both if name not in first]
    assert resumed.endswith(".resumed_after_2") and both[resumed] == [("loss", 3, 0.35)]
    starts = [e.step for e in read_events(tb / resumed)
              if e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [3]
    # A fresh run again: one file, this run's rows only.
    with MetricsLogger(str(tmp_path)) as log:
        log.log(1, {"loss": 0.9})
    assert list(scalars(tb).values()) == [[("loss", 1, 0.9)]]
    assert read_jsonl(str(tmp_path / "metrics.jsonl")) == [{"step": 1, "loss": 0.9}]


def test_drop_rows_after_keys_rows_by_the_given_field(tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [{"iteration": i, "prompt": f"p{i}"} for i in (1, 2, 3, 4)] + [{"note": "no key"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"iteration": 5, "pro')
    drop_rows_after(str(path), 2, key="iteration")
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        rows[0], rows[1], rows[4]]
    drop_rows_after(str(tmp_path / "missing.jsonl"), 2)  # nothing to drop: no file is made
    assert not (tmp_path / "missing.jsonl").exists()


def test_format_table_escapes_and_cuts():
    table = format_table([{"prompt": "a|b", "response": "x" * 100, "score": 0.123456}], width=10)
    lines = table.splitlines()
    assert lines[0] == "| prompt | response | score |"
    assert lines[2] == "| a\\|b | xxxxxxxxx… | 0.1235 |"
