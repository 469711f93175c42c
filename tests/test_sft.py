"""SFT: the loss against numpy, packed rows equal examples run alone (logits and loss), a
tiny model memorises its data, a resumed run ends bitwise where an uninterrupted one does,
and the CLI (a real subprocess) writes metrics, checkpoints and a Hugging Face export."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import config, models
from rlhf_jax.stages import sft
from rlhf_jax.data.sft import SFTDataConfig, load_sft
from rlhf_jax.world.tiny import tiny_config, train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORDS = "the cat sat on a mat and dog ran to park good bad very happy sad red blue green"


# ----------------------------------------------------------------------------- loss


def test_token_nll_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5))
    mask = np.asarray([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    want_sum, want_count, want_correct = 0.0, 0, 0
    for b in range(2):
        for t in range(1, 5):  # token t is predicted from the logits at t - 1
            if mask[b, t]:
                z = logits[b, t - 1]
                logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
                want_sum -= logp[ids[b, t]]
                want_count += 1
                want_correct += int(np.argmax(z) == ids[b, t])
    nll, count, correct = sft.token_nll(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(nll), want_sum, rtol=1e-6)
    assert float(count) == want_count and float(correct) == want_correct


def test_no_token_is_predicted_from_another_example():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert sft.same_segment_as_previous(seg).tolist() == [[0, 1, 1, 0, 1, 0, 0, 0]]


# ----------------------------------------------------------------------------- packing


def packed_row(lengths, total, vocab=97, seed=0):
    """Random examples of `lengths` packed into one row of `total` tokens (then padding)."""
    rng = np.random.default_rng(seed)
    examples = [rng.integers(3, vocab, n).astype(np.int32) for n in lengths]
    ids, seg = np.zeros((1, total), np.int32), np.zeros((1, total), np.int32)
    t = 0
    for s, e in enumerate(examples, 1):
        ids[0, t:t + len(e)], seg[0, t:t + len(e)] = e, s
        t += len(e)
    return examples, ids, seg


@pytest.mark.parametrize("family,scan", [("gpt2", True), ("llama", False)])
def test_packed_logits_equal_each_example_alone(family, scan):
    model, params = models.init_model(tiny_config(family, vocab_size=97, scan_layers=scan), seed=1)
    apply = jax.jit(lambda ids, mask, seg=None: model.apply({"params": params}, ids, mask,
                                                            segment_ids=seg))
    examples, ids, seg = packed_row([5, 9, 4], 24)
    packed = np.asarray(apply(ids, (seg > 0) * 1, seg))[0]
    alone_ids = np.zeros((3, 24), np.int32)  # each example alone in its row (then padding)
    for i, e in enumerate(examples):
        alone_ids[i, :len(e)] = e
    alone = np.asarray(apply(alone_ids, (alone_ids > 0) * 1))
    t = 0
    for i, e in enumerate(examples):
        np.testing.assert_allclose(packed[t:t + len(e)], alone[i, :len(e)], atol=1e-5)
        t += len(e)
    unpacked = np.asarray(apply(ids, (seg > 0) * 1))[0]
    assert np.abs(unpacked[5:14] - packed[5:14]).max() > 1e-3  # the test is not vacuous


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer([WORDS, WORDS.upper()] * 20, 320, str(path))
    return str(path)


def memorisable_rows(n=8):
    rng = np.random.default_rng(0)
    words = WORDS.split()
    return [{"prompt": f"{words[i]} {words[i + 1]}:",
             "completion": " " + " ".join(rng.choice(words, 6))} for i in range(n)]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def test_packed_loss_equals_unpacked_loss(tmp_path, tok_dir):
    tok = models.load_tokenizer(tok_dir)
    path = write_jsonl(tmp_path / "m.jsonl", memorisable_rows())
    model, params = models.init_model(tiny_config("llama", vocab_size=320), seed=0)
    sums = {}
    for packing in (False, True):
        data, _ = load_sft(SFTDataConfig(train=path, max_length=64, packing=packing), tok,
                           batch_size=1, seed=0)
        items = np.arange(len(data.rows) if packing else len(data))
        batch = {k: jnp.asarray(v) for k, v in data.collate(items, 64).items()}
        nll, (count, _) = jax.jit(functools.partial(sft.loss_fn, model=model))(params, batch)
        sums[packing] = (float(nll), float(count), len(items))
    assert sums[True][2] < sums[False][2]  # fewer rows: the examples were packed
    assert sums[True][1] == sums[False][1]
    np.testing.assert_allclose(sums[True][0], sums[False][0], rtol=1e-5)


# ----------------------------------------------------------------------------- training


def run_config(out, data, tok_dir, *overrides):
    return config.load(sft.SFTConfig, None, [
        f"out_dir={out}", f"data.train={data}", f"model.tokenizer={tok_dir}", "data.max_length=32",
        "batch_size=8", "optim.learning_rate=1e-2", "optim.schedule=constant", "log_every=1",
        "model.init.num_layers=1", "model.init.hidden_size=32", "model.init.num_heads=2",
        "model.init.intermediate_size=64", "model.init.max_position_embeddings=64", *overrides])


def train_losses(out):
    from rlhf_jax.train.logging import read_jsonl

    return [r["train/loss"] for r in read_jsonl(os.path.join(out, "metrics.jsonl"))
            if "train/loss" in r]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tok_dir):
    """An uninterrupted 20-step run on 8 rows."""
    root = tmp_path_factory.mktemp("mem")
    data = write_jsonl(root / "m.jsonl", memorisable_rows())
    cfg = run_config(root / "full", data, tok_dir, "steps=20")
    return cfg, data, sft.train(cfg, log=lambda _: None)


def test_tiny_model_memorises_its_data(memorised):
    cfg, _, result = memorised
    losses = train_losses(cfg.out_dir)
    # below 2.9 nats, the cost of guessing each word of a completion from the word list
    assert len(losses) == 20 and losses[-1] < min(0.4 * losses[0], 2.4), losses
    model, _ = models.load_hf(result["export"])
    assert models.head_of(model) == "lm"


def test_resumed_run_ends_bitwise_where_an_uninterrupted_one_does(memorised, tmp_path, tok_dir):
    cfg, data, result = memorised
    out = tmp_path / "resumed"
    sft.train(run_config(out, data, tok_dir, "steps=10", "export=false"), log=lambda _: None)
    logs = []
    sft.train(run_config(out, data, tok_dir, "steps=20"), log=logs.append)
    assert any("resumed from" in line and "at step 10" in line for line in logs)
    assert train_losses(out) == train_losses(cfg.out_dir)
    _, want = models.load_hf(result["export"])
    _, got = models.load_hf(str(out / "export"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)


# ----------------------------------------------------------------------------- CLI


def test_cli_smoke(tmp_path):
    from rlhf_jax.train.logging import read_jsonl

    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "sft", "--config", "configs/sft_tiny.yaml",
         "steps=4", f"out_dir={tmp_path}", "data.synthetic.num_train=64",
         "data.synthetic.num_eval=16", "log_every=2", "eval_every=2"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 4]
    assert any("perf/mfu" in r for r in records)
    assert os.path.isdir(tmp_path / "checkpoints" / "4")
    with open(tmp_path / "export" / "config.json") as f:
        assert json.load(f)["architectures"] == ["GPT2LMHeadModel"]
    assert "held-out after 4 steps: loss" in proc.stdout


def one_line_cli_error(capsys, *args):
    code = sft.cli(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return code, err[0]


def test_cli_bad_key_is_one_line_naming_the_closest(capsys, tmp_path):
    code, err = one_line_cli_error(capsys, "--config", str(ROOT / "configs" / "sft_tiny.yaml"),
                                   "data.packin=true", f"out_dir={tmp_path}")
    assert code == 2 and "unknown config key 'data.packin'; did you mean 'data.packing'?" in err


def test_cli_bad_data_is_one_line(capsys, tmp_path, tok_dir):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "b"}])
    code, err = one_line_cli_error(capsys, f"data.train={data}", f"model.tokenizer={tok_dir}",
                                   "model.init.hidden_size=32", f"out_dir={tmp_path}")
    assert code == 1 and err.startswith("rlhf-jax sft: data error: ") and "'answer'" in err
