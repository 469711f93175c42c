"""`rlhf-jax generate` (rlhf_jax/tools/generate.py) as a user runs it: output, resume from a
partial file, the compilation cache, --help, warnings, and one line with the right exit code
for every bad input (2: a usage mistake, 1: data or files that cannot be used)."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from rlhf_jax import models
from rlhf_jax.models import dtype_warning
from rlhf_jax.models import sampling as gen
from rlhf_jax.tools import generate as generate_cli
from rlhf_jax.world.tiny import tiny_config, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_lm"))
    texts = ["the cat sat on the mat", "hello world", "a quick brown fox jumps"] * 20
    tokenizer = train_tokenizer(texts, 300)
    model, params = models.init_model(tiny_config("gpt2", vocab_size=300))
    models.save_hf(path, model, params, tokenizer=tokenizer)
    return path


def rlhf_jax_generate(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`python -m rlhf_jax.cli generate ARGS` from the repository root."""
    return subprocess.run([sys.executable, "-m", "rlhf_jax.cli", "generate", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env or {**os.environ, "XLA_FLAGS": ""})


def one_line(stderr: str) -> str:
    """The only line on stderr (progress bars aside); fails on a traceback or more lines."""
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_cli_writes_completions(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n"
                               for p in ["the cat", "hello", "a quick brown fox"]))
    out = tmp_path / "out" / "completions.jsonl"
    proc = rlhf_jax_generate("--model", tiny_model_dir, "--prompts", prompts, "--out", out,
                             "--max-new-tokens", "12", "--batch-size", "2", "--temperature",
                             "0.8", "--top-p", "0.9", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["the cat", "hello", "a quick brown fox"]
    for r in rows:
        assert set(r) == {"prompt", "completion", "num_tokens", "stopped"}
        assert 1 <= r["num_tokens"] <= 12 and (r["stopped"] or r["num_tokens"] == 12)
    assert any(r["completion"] for r in rows)
    assert "tokens/s" in proc.stdout
    assert "warning" not in proc.stderr  # float32 on the CPU: nothing to warn about


def test_cli_second_run_loads_its_programs_from_the_compilation_cache(tiny_model_dir, tmp_path):
    """`rlhf-jax` keeps compiled programs in RLHF_JAX_COMPILE_CACHE: a rerun of the same
    command loads the generate program from it (jax logs the hit), adds no entry and writes
    the same output."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nhello world\n")
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update({"XLA_FLAGS": "", "RLHF_JAX_COMPILE_CACHE": str(cache),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_LOG_COMPILES": "1"})
    outputs, entries, hits = [], [], []
    for run in range(2):
        out = tmp_path / f"out{run}.jsonl"
        proc = rlhf_jax_generate("--model", tiny_model_dir, "--prompts", prompts, "--out", out,
                                 "--max-new-tokens", "6", "--seed", "3", env=env)
        assert proc.returncode == 0, proc.stderr
        outputs.append(out.read_text())
        entries.append(sorted(os.listdir(cache)))
        hits.append("Persistent compilation cache hit for 'jit_generate'" in proc.stderr)
    assert hits == [False, True]
    assert any("generate" in name for name in entries[0])
    assert entries[1] == entries[0]
    assert outputs[1] == outputs[0] and outputs[0]


def _cli_args(model_dir, prompts, out):
    return ["--model", model_dir, "--prompts", str(prompts), "--out", str(out),
            "--max-new-tokens", "5", "--batch-size", "2", "--seed", "4"]


def test_cli_resumes_from_the_batches_an_interrupted_run_saved(tiny_model_dir, tmp_path,
                                                              monkeypatch, capsys):
    prompts = ["the cat", "hello", "a quick brown fox", "the mat", "hello world"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    make = gen.make_generate_fn
    calls = []

    def counting(stop_after):
        def make_fn(*a, **k):
            fn = make(*a, **k)

            def run(*args):
                if len(calls) == stop_after:
                    raise KeyboardInterrupt  # Ctrl-C during the next batch
                calls.append(args[1].shape)
                return fn(*args)
            return run
        return make_fn

    monkeypatch.setattr(generate_cli, "make_generate_fn", counting(stop_after=1))
    with pytest.raises(KeyboardInterrupt):
        generate_cli.cli(_cli_args(tiny_model_dir, path, out))
    assert not out.exists()
    header, *saved = [json.loads(line) for line in partial.read_text().splitlines()]
    assert header["settings"]["seed"] == 4 and header["settings"]["max_new_tokens"] == 5
    assert len(saved) == 2 and all(prompts[r["index"]] == r["prompt"] for r in saved)
    with open(partial, "a") as f:
        f.write('{"index": 4, "prompt": "hel')  # a line cut short by the kill

    calls.clear()
    monkeypatch.setattr(generate_cli, "make_generate_fn", counting(stop_after=-1))
    assert generate_cli.cli(_cli_args(tiny_model_dir, path, out)) == 0
    assert "resuming: 2 of 5 completions" in capsys.readouterr().err
    assert len(calls) == 2  # the 3 prompts left, in batches of 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    for r in saved:  # kept as saved, not sampled again
        assert rows[r.pop("index")] == r
    assert not partial.exists()


@pytest.mark.parametrize("content,extra,expected", [
    ('{"index": 0, "prompt": "something else", "completion": ""}\n', [],
     "completions of other prompts"),
    ('{"index": 0, "prompt": "the cat"}\nnot json\n{"index": 1, "prompt": "hello"}\n', [],
     "line 3 is not a saved completion"),
    ('{"index": 0, "prompt": "the cat"}\n', ["--seed", "5", "--temperature", "0.5"],
     "other settings (seed, temperature)"),
    (None, [], "is not a partial output"),
])
def test_cli_refuses_a_partial_file_it_cannot_resume_from(tiny_model_dir, tmp_path,
                                                         content, extra, expected):
    """Another run's partial file cannot be used: exit code 1, and the file is left alone."""
    path = tmp_path / "prompts.txt"
    path.write_text("the cat\nhello\n")
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    args = _cli_args(tiny_model_dir, path, out)
    settings = generate_cli._settings(generate_cli._parser().parse_args(args))
    content = ('{"index": 0}\n' if content is None
               else json.dumps({"settings": settings}) + "\n" + content)
    partial.write_text(content)
    proc = rlhf_jax_generate(*args, *extra)
    line = one_line(proc.stderr)
    assert proc.returncode == 1
    assert expected in line and "delete" in line
    assert partial.read_text() == content and not out.exists()


# --- bad input: one line each, exit code 2 for usage mistakes and 1 for unusable files.


def _truncated_copy(model_dir, tmp_path):
    copy = tmp_path / "truncated_model"
    copy.mkdir()
    for name in os.listdir(model_dir):
        data = open(os.path.join(model_dir, name), "rb").read()
        if name == "model.safetensors":
            data = data[:len(data) // 2]
        (copy / name).write_bytes(data)
    return copy


@pytest.mark.parametrize("case,code,expected", [
    # usage mistakes: 2
    ("unknown flag", 2, ["unrecognized arguments: --max-tokens", "did you mean --max-new-tokens",
                         "--help"]),
    ("flag value of the wrong type", 2, ["--top-k", "invalid int value", "--help"]),
    ("sampling setting out of range", 2, ["--top-p 1.5", "(0, 1]"]),
    ("batch size zero", 2, ["--batch-size 0", "1 or more"]),
    # data or files that cannot be used: 1
    ("prompts file missing", 1, ["does not exist", ".jsonl"]),
    ("jsonl row without a prompt", 1, ["line 2 has no string 'prompt' field"]),
    ("prompts file of blank lines", 1, ["has no prompts"]),
    ("prompt too long for the model", 1, ["leave 244; shorten it", "--truncate"]),
    ("model directory missing", 1, ["does not exist"]),
    ("truncated weights", 1, ["truncated"]),
])
def test_bad_input_is_one_line_with_its_exit_code(tiny_model_dir, tmp_path, case, code,
                                                  expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nhello\n")
    model, extra = tiny_model_dir, []
    if case == "unknown flag":
        extra = ["--max-tokens", "4"]
    elif case == "flag value of the wrong type":
        extra = ["--top-k", "many"]
    elif case == "sampling setting out of range":
        extra = ["--top-p", "1.5"]
    elif case == "batch size zero":
        extra = ["--batch-size", "0"]
    elif case == "prompts file missing":
        prompts = tmp_path / "missing.txt"
    elif case == "jsonl row without a prompt":
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text('{"prompt": "hi"}\n{"text": "no prompt here"}\n')
    elif case == "prompts file of blank lines":
        prompts.write_text("\n\n")
    elif case == "prompt too long for the model":
        prompts.write_text("hello " * 300 + "\n")
    elif case == "model directory missing":
        model = tmp_path / "no_model"
    elif case == "truncated weights":
        model = _truncated_copy(tiny_model_dir, tmp_path)
    proc = rlhf_jax_generate("--model", model, "--prompts", prompts, "--out",
                             tmp_path / "out.jsonl", "--max-new-tokens", "12", *extra)
    line = one_line(proc.stderr)
    assert proc.returncode == code, proc.stderr
    assert line.startswith("rlhf-jax generate: error:")
    for word in expected:
        assert word in line, (word, line)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_reward_model_is_refused_with_what_to_pass_instead(tiny_model_dir, hf_checkpoint,
                                                             tmp_path):
    """Ours and transformers' sequence-classification checkpoints would load with an LM head
    on their tied embeddings and generate text; the command refuses them (a usage mistake)."""
    ours = tmp_path / "our_rm"
    rm, params = models.init_model(tiny_config("gpt2", vocab_size=300), "reward")
    models.save_hf(str(ours), rm, jax.device_get(params))
    theirs, _ = hf_checkpoint("llama", "reward")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\n")
    for path, arch in ((ours, "GPT2ForSequenceClassification"),
                       (theirs, "LlamaForSequenceClassification")):
        proc = rlhf_jax_generate("--model", path, "--tokenizer", tiny_model_dir, "--prompts",
                                 prompts, "--out", tmp_path / "out.jsonl")
        line = one_line(proc.stderr)
        assert proc.returncode == 2, proc.stderr
        for word in ("is a reward model", arch, "cannot generate", "pass a causal LM",
                     "*ForCausalLM"):
            assert word in line, (word, line)
        assert not (tmp_path / "out.jsonl").exists()


def test_bfloat16_on_the_cpu_warns_in_one_line_and_goes_on(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nhello\n")
    out = tmp_path / "out.jsonl"
    proc = rlhf_jax_generate("--model", tiny_model_dir, "--prompts", prompts, "--out", out,
                             "--max-new-tokens", "4", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stderr) == ("rlhf-jax generate: warning: "
                                     + dtype_warning("bfloat16", "cpu"))
    assert len(out.read_text().splitlines()) == 2


def test_dtype_warning_only_for_bfloat16_on_the_cpu():
    warning = dtype_warning("bfloat16", "cpu")
    assert "\n" not in warning and "slower than float32" in warning and "1.7x" in warning
    assert dtype_warning("float32", "cpu") is None
    assert dtype_warning("bfloat16", "gpu") is None and dtype_warning("bfloat16", "tpu") is None


def test_help_shows_every_default():
    proc = rlhf_jax_generate("--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for flag, default in (("--batch-size", "16"), ("--seed", "0"), ("--temperature", "1.0"),
                          ("--top-p", "1.0"), ("--top-k", "0"), ("--max-new-tokens", "64"),
                          ("--dtype", "float32"), ("--prompt-bucket", "64")):
        # The flag's own entry (after the usage lines): up to the next option.
        entry = re.search(rf"\s{flag} \S+ (.*?)(?= --[a-z]|$)", text.split("options:")[1])
        assert entry and f"(default: {default})" in entry.group(1), (flag, text)
    assert "--dtype" in text and "slower than float32" in text  # the bfloat16 caveat
