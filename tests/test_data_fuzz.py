"""Every file format the loaders read, broken in the common ways, through the command line:
each broken file ends in ONE line on stderr that names the file and the fix, exit code 1,
never a traceback; a file that is valid after all (a UTF-8 BOM before valid rows, one huge
but valid row) trains. Runs `rlhf_jax.cli.main` in-process; a few cases run as a user runs
them, in a subprocess."""

import codecs
import io
import json
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from rlhf_jax import cli
from rlhf_jax.data import DataError
from rlhf_jax.data.prompts import PromptDataConfig, load_prompts
from rlhf_jax.world.tiny import train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
FORMATS = ("jsonl", "json", "csv", "parquet")
N_ROWS = 40
HUGE_PROMPT = "review " * 200_000  # 1.4 MB in one row: over the JSON reader's 320 kB block
# A small, fast-compiling run for the files that are valid (width 32, batch 8).
SMALL = ["steps=1", "batch_size=8", "normalise_after_training=false", "model.init.hidden_size=32",
         "model.init.num_heads=2", "model.init.intermediate_size=64"]


def preference_rows(n=N_ROWS):
    # Commas in the texts make CSV quote them, so a cut last line leaves a quote open.
    return [{"prompt": f"review {i}:", "chosen": " a great movie, loved it",
             "rejected": f" boring plot, {i}"} for i in range(n)]


def sft_rows(n=N_ROWS):
    return [{"prompt": f"review {i}:", "completion": f" a great movie, {i}"} for i in range(n)]


def prompt_rows(n=N_ROWS):
    return [{"prompt": f"the film was, {i}"} for i in range(n)]


def encode(fmt, rows):
    """The bytes of `rows` written as a `fmt` file the way people write them."""
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if fmt == "json":
        return json.dumps(rows, indent=1).encode()
    if fmt == "txt":
        return "".join(r["prompt"] + "\n" for r in rows).encode()
    if fmt == "csv":
        return pd.DataFrame(rows).to_csv(index=False).encode()
    buf = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buf)
    return buf.getvalue()


def broken(fmt, case, rows):
    """The bytes of a `fmt` file of `rows` broken by `case`."""
    if case == "empty":
        return b""
    if case == "blank":
        return b"\n\n  \n\t\n"
    if case == "truncated":  # cut inside the last row
        return encode(fmt, rows)[:-4]
    if case == "binary":
        return np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    if case == "bom":
        return codecs.BOM_UTF8 + encode(fmt, rows)
    rows = [dict(r) for r in rows]
    if case == "huge":
        rows[3]["prompt"] = HUGE_PROMPT
    elif fmt == "csv":  # wrong types; CSV holds text, so only a number column can be wrong
        rows = [{**r, "margin": "lots" if i == 5 else "1.5"} for i, r in enumerate(rows)]
    elif fmt == "parquet":  # a typed column: every value of it has the wrong type
        rows = [{**r, "chosen": i} for i, r in enumerate(rows)]
    else:
        rows[5]["chosen"] = 42
    return encode(fmt, rows)


# (format, case) -> (exit code, words the one line holds besides the file's name); exit 0:
# the file is valid, every row loads in the layout it was written in.
FILE_FIX = {"jsonl": "write one JSON object per line", "json": "one JSON array of objects",
            "csv": "write UTF-8 CSV with a header row", "parquet": "to_parquet"}
EXPECTED = {}
for _fmt in FORMATS:
    _fix = FILE_FIX[_fmt]
    EXPECTED[_fmt, "empty"] = (1, ["no rows", "empty or holds only blank lines", _fix])
    EXPECTED[_fmt, "blank"] = (1, ["no rows", "empty or holds only blank lines", _fix])
    EXPECTED[_fmt, "binary"] = (1, ["is not UTF-8 text", _fix])
    EXPECTED[_fmt, "bom"] = (0, [])
    EXPECTED[_fmt, "huge"] = (0, [])
    EXPECTED[_fmt, "wrong_types"] = (1, ["row 5, column 'chosen': expected a string, got int",
                                         "data.on_bad_row=drop"])
EXPECTED.update({
    ("jsonl", "truncated"): (1, ["line 40 is not valid JSON", FILE_FIX["jsonl"]]),
    ("json", "truncated"): (1, ["is not valid JSON", "line", FILE_FIX["json"]]),
    ("csv", "truncated"): (1, ["could not be read as csv", "EOF inside string",
                               FILE_FIX["csv"]]),
    ("parquet", "truncated"): (1, ["could not be read as parquet", FILE_FIX["parquet"]]),
    ("parquet", "binary"): (1, ["could not be read as parquet", FILE_FIX["parquet"]]),
    # A BOM before a parquet file is not a text marker but damage to a binary file.
    ("parquet", "bom"): (1, ["could not be read as parquet", FILE_FIX["parquet"]]),
    ("csv", "wrong_types"): (1, ["row 5, column 'margin': expected a finite number, got 'lots'",
                                 "data.on_bad_row=drop"]),
    ("parquet", "wrong_types"): (1, ["row 0, column 'chosen': expected a string, got int",
                                     "data.on_bad_row=drop"]),
})
FILE_CASES = ("empty", "blank", "truncated", "binary")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    words = "review of the film a great movie loved it boring plot the film was"
    path = tmp_path_factory.mktemp("tok")
    train_tokenizer([words] * 20, 280, str(path))
    return path


def write(tmp_path, fmt, case, rows):
    path = tmp_path / f"{case}.{fmt}"
    path.write_bytes(broken(fmt, case, rows))
    return path


def run_cli(argv, capsys, monkeypatch):
    """(exit code, stderr lines without progress bars, stdout and stderr) of `rlhf-jax ARGV`
    run in-process."""
    monkeypatch.chdir(ROOT)
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    return code, lines, out + err


def assert_one_line(code, lines, err, path, words):
    assert code == 1, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "data error" in lines[0] and str(path) in lines[0], lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])


def rm_argv(path, tok, out):
    return ["rm", "--config", "configs/rm_tiny.yaml", "data.synthetic=null", f"data.train={path}",
            f"model.tokenizer={tok}", f"out_dir={out}", *SMALL]


@pytest.mark.parametrize("fmt,case", sorted(EXPECTED), ids=[f"{f}-{c}" for f, c in sorted(EXPECTED)])
def test_preference_file(fmt, case, tok, tmp_path, capsys, monkeypatch):
    path = write(tmp_path, fmt, case, preference_rows())
    code, lines, err = run_cli(rm_argv(path, tok, tmp_path / "run"), capsys, monkeypatch)
    want, words = EXPECTED[fmt, case]
    if want == 0:  # every row read, in the layout written (a kept BOM would rename 'prompt')
        assert code == 0, err
        assert f"{path}: {N_ROWS} rows, none dropped; explicit format, {N_ROWS} pairs" in err
        return
    assert_one_line(code, lines, err, path, words)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", FILE_CASES)
def test_sft_file(fmt, case, tok, tmp_path, capsys, monkeypatch):
    path = write(tmp_path, fmt, case, sft_rows())
    code, lines, err = run_cli(
        ["sft", "--config", "configs/sft_tiny.yaml", "data.synthetic=null", f"data.train={path}",
         f"model.tokenizer={tok}", f"out_dir={tmp_path / 'run'}", "steps=1"],
        capsys, monkeypatch)
    assert_one_line(code, lines, err, path, EXPECTED[fmt, case][1])


PROMPT_CASES = [(f, c) for f in (*FORMATS, "txt") for c in FILE_CASES
                if (f, c) != ("txt", "truncated")]  # a cut last line of text is a shorter prompt


@pytest.mark.parametrize("fmt,case", PROMPT_CASES, ids=[f"{f}-{c}" for f, c in PROMPT_CASES])
def test_ppo_prompts_file(fmt, case, ppo_inputs, tmp_path, capsys, monkeypatch):
    path = write(tmp_path, fmt, case, prompt_rows())
    code, lines, err = run_cli(
        ["ppo", "--config", "configs/ppo_tiny.yaml", f"policy={ppo_inputs / 'policy'}",
         f"reward_model={ppo_inputs / 'rm'}", f"prompts.train={path}", "iterations=1",
         f"out_dir={tmp_path / 'run'}"], capsys, monkeypatch)
    if fmt == "txt":
        words = {"empty": ["no rows", "one prompt per line"], "blank": ["no rows"],
                 "binary": ["is not UTF-8 text", "save it as UTF-8"]}[case]
    else:
        words = EXPECTED[fmt, case][1]
    assert_one_line(code, lines, err, path, words)


def test_prompts_bom_and_too_few_for_a_batch(ppo_inputs, tmp_path):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(ppo_inputs / "tok"))
    for fmt in ("txt", "jsonl", "csv"):
        path = write(tmp_path, fmt, "bom", prompt_rows(3))
        prompts, _ = load_prompts(PromptDataConfig(train=str(path)), tokenizer, seed=0)
        assert prompts.texts == [r["prompt"] for r in prompt_rows(3)], fmt  # no stray BOM
    with pytest.raises(DataError) as e:
        load_prompts(PromptDataConfig(train=str(path)), tokenizer, seed=0, batch_size=4)
    assert str(e.value) == (f"{path}: 3 prompts are fewer than one batch of batch_size=4; "
                            "lower batch_size or add prompts")


def test_fewer_rows_than_one_batch(tok, tmp_path, capsys, monkeypatch):
    path = tmp_path / "few.jsonl"
    path.write_bytes(encode("jsonl", preference_rows(5)))
    code, lines, err = run_cli(rm_argv(path, tok, tmp_path / "run"), capsys, monkeypatch)
    assert_one_line(code, lines, err, path, [
        "5 rows, none dropped; explicit format, 5 pairs: too few for one batch of batch_size=8",
        "lower batch_size or add rows"])


# ----------------------------------------------------------------------------- as a user runs it


# The two cases that ended in a traceback before: an empty file (an IndexError) and fewer
# rows than one batch (a bare ValueError).
@pytest.mark.parametrize("rows,words", [
    ([], "no rows (the file is empty or holds only blank lines); write one JSON object per line "
         "(.jsonl) or one JSON array of objects (.json)"),
    (preference_rows(5), "5 rows, none dropped; explicit format, 5 pairs: too few for one batch "
                         "of batch_size=32; lower batch_size or add rows"),
], ids=["empty", "too few rows"])
def test_subprocess(rows, words, tok, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(encode("jsonl", rows))
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.cli", "rm", "--config", "configs/rm_tiny.yaml",
         "data.synthetic=null", f"data.train={path}", f"model.tokenizer={tok}",
         f"out_dir={tmp_path / 'run'}", "steps=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0] == f"rlhf-jax rm: data error: {path}: {words}"
