"""Bad input of every kind, through the command line: each ends in ONE line on stderr that
names the problem and the fix, with exit code 2 (config) or 1 (data, files), never a
traceback. Runs in-process through `rlhf_jax.cli.main`."""

import json
import pathlib

import jax
import pytest

from rlhf_jax import cli, models
from rlhf_jax.world.tiny import tiny_config, train_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOOD = {"prompt": "review of the film:", "chosen": " a great movie", "rejected": " boring plot"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    tok = train_tokenizer(["review of the film: a great movie, boring plot"] * 20, 280,
                          str(root / "tok"))
    cfg = tiny_config("gpt2", vocab_size=320, max_position_embeddings=64)
    model, params = models.init_model(cfg, "lm")
    models.save_hf(str(root / "policy"), model, jax.device_get(params), tok)
    rm, rp = models.init_model(cfg, "reward")
    models.save_hf(str(root / "rm"), rm, jax.device_get(rp), tok)

    def jsonl(name, rows, raw=None):
        path = root / name
        path.write_text(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    def model_dir(name, change):
        path = root / name
        path.mkdir()
        for f in (root / "policy").iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        change(path)
        return str(path)

    def auto_map(path):
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModel": "x.Y"}}))

    def pickle_only(path):
        (path / "model.safetensors").rename(path / "pytorch_model.bin")

    def truncated(path):
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[: len(data) // 2])

    long_text = " ".join(["great"] * 200)
    return {
        "tok": str(root / "tok"), "policy": str(root / "policy"), "rm": str(root / "rm"),
        "good": jsonl("good.jsonl", [GOOD] * 40),
        "bad_json": jsonl("bad_json.jsonl", None, json.dumps(GOOD) + "\n{not json\n"),
        "misnamed": jsonl("misnamed.jsonl", [{**GOOD, "chosen_text": "x"} for _ in range(4)]
                          and [{"prompt": "p", "chosen_text": "a", "rejected": "b"}] * 4),
        "not_string": jsonl("not_string.jsonl", [GOOD, {**GOOD, "chosen": 42}]),
        "empty": jsonl("empty.jsonl", [GOOD, {**GOOD, "rejected": "   "}]),
        "identical": jsonl("identical.jsonl", [GOOD, {**GOOD, "rejected": GOOD["chosen"]}]),
        "too_long": jsonl("too_long.jsonl", [GOOD, {**GOOD, "prompt": long_text}]),
        "bad_margin": jsonl("bad_margin.jsonl", [{**GOOD, "margin": "lots"}]),
        "bad_ranks": jsonl("bad_ranks.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"],
                                                "ranks": [1, 2]}]),
        "prompts_misnamed": jsonl("pm.jsonl", [{"question": "hi"}] * 20),
        "prompts_empty": jsonl("pe.jsonl", [{"prompt": "a film"}, {"prompt": ""}]),
        "prompts_long": jsonl("pl.jsonl", [{"prompt": long_text}] * 20),
        "sft_misnamed": jsonl("sm.jsonl", [{"prompt": "p", "answer": "a"}] * 8),
        "gen_bad_jsonl": jsonl("gb.jsonl", None, '{"prompt": "ok"}\n[1, 2]\n'),
        "auto_map": model_dir("auto_map", auto_map),
        "pickle_only": model_dir("pickle_only", pickle_only),
        "truncated": model_dir("truncated", truncated),
        "bad_yaml": jsonl("bad.yaml", None, "batch_size: [1, 2\nsteps: 3\n"),
    }


def rm_args(f, data, *extra):
    return ["rm", "--config", "configs/rm_tiny.yaml", "data.synthetic=null", f"data.train={data}",
            f"model.tokenizer={f['tok']}", "steps=1", *extra]


def ppo_args(f, *extra):
    return ["ppo", "--config", "configs/ppo_tiny.yaml", f"policy={f['policy']}",
            f"reward_model={f['rm']}", f"prompts.train={f['good']}", "iterations=1", *extra]


# (id, argv(files, tmp_path), exit code, words the one line must contain)
CASES = [
    ("unknown key", lambda f, t: rm_args(f, f["good"], "optim.learnin_rate=1e-3"), 2,
     ["optim.learnin_rate", "did you mean 'optim.learning_rate'"]),
    ("wrong type", lambda f, t: rm_args(f, f["good"], "batch_size=lots"), 2,
     ["batch_size", "expects int"]),
    ("batch not divisible by accumulation", lambda f, t: rm_args(f, f["good"], "grad_accum=5"),
     2, ["grad_accum", "divisor of batch_size=32"]),
    ("mesh larger than the devices", lambda f, t: rm_args(f, f["good"], "mesh=[16,1,1]"), 2,
     ["mesh", "needs 16 devices"]),
    ("missing config file", lambda f, t: ["rm", "--config", str(t / "nope.yaml")], 2,
     ["nope.yaml", "does not exist"]),
    ("config file not YAML", lambda f, t: ["rm", "--config", f["bad_yaml"]], 2,
     ["not valid YAML", "line"]),
    ("code-loading key", lambda f, t: rm_args(f, f["good"], "model.trust_remote_code=true"), 2,
     ["trust_remote_code", "never"]),
    ("data file missing", lambda f, t: rm_args(f, str(t / "none.jsonl")), 1,
     ["none.jsonl", "no such file"]),
    ("malformed JSON line", lambda f, t: rm_args(f, f["bad_json"]), 1,
     ["bad_json.jsonl", "line 2 is not valid JSON", "one JSON object per line"]),
    ("misnamed column", lambda f, t: rm_args(f, f["misnamed"]), 1,
     ["column 'chosen' is missing", "did you mean 'chosen_text'"]),
    ("non-string text", lambda f, t: rm_args(f, f["not_string"]), 1, ["row 1", "'chosen'"]),
    ("empty text", lambda f, t: rm_args(f, f["empty"]), 1, ["row 1", "'rejected'", "empty"]),
    ("identical chosen and rejected", lambda f, t: rm_args(f, f["identical"]), 1,
     ["row 1", "identical"]),
    ("over-length row", lambda f, t: rm_args(f, f["too_long"], "data.prompt_truncation=none"), 1,
     ["row 1", "max_length", "prompt_truncation"]),
    ("bad margin", lambda f, t: rm_args(f, f["bad_margin"]), 1, ["margin", "finite number"]),
    ("ranks and responses differ in length", lambda f, t: rm_args(f, f["bad_ranks"]), 1,
     ["row 0", "ranks"]),
    ("model directory missing", lambda f, t: rm_args(f, f["good"], f"model.path={t / 'none'}",
                                                     "model.init=null"), 1,
     ["does not exist"]),
    ("remote code in model config", lambda f, t: rm_args(f, f["good"],
                                                         f"model.path={f['auto_map']}",
                                                         "model.init=null"), 1,
     ["auto_map", "never runs remote code"]),
    ("pickle weights only", lambda f, t: rm_args(f, f["good"], f"model.path={f['pickle_only']}",
                                                 "model.init=null"), 1, ["Pickle"]),
    ("truncated weights", lambda f, t: rm_args(f, f["good"], f"model.path={f['truncated']}",
                                               "model.init=null"), 1, ["truncated"]),
    ("temperature differs between sampling and update",
     lambda f, t: ppo_args(f, "sampling.temperature=0.7"), 2, ["sampling.temperature", "ppo"]),
    ("PPO batch not divisible by minibatches", lambda f, t: ppo_args(f, "batch_size=7"), 2,
     ["batch_size", "multiple"]),
    ("prompt column missing", lambda f, t: ppo_args(f, f"prompts.train={f['prompts_misnamed']}"),
     1, ["no column 'prompt'", "question"]),
    ("empty prompt", lambda f, t: ppo_args(f, f"prompts.train={f['prompts_empty']}"), 1,
     ["row 1", "empty"]),
    ("prompt longer than the limit", lambda f, t: ppo_args(
        f, f"prompts.train={f['prompts_long']}", "prompts.truncation=none"), 1,
     ["max_prompt_length", "prompts.truncation=left"]),
    ("prompts plus response exceed the model", lambda f, t: ppo_args(
        f, "prompts.max_prompt_length=60", "sampling.max_new_tokens=10"), 2,
     ["max_prompt_length", "64 positions"]),
    ("SFT completion column misnamed", lambda f, t: [
        "sft", "--config", "configs/sft_tiny.yaml", "data.synthetic=null",
        f"data.train={f['sft_misnamed']}", f"model.tokenizer={f['tok']}", "steps=1"], 1,
     ["completion"]),
    ("generate: prompts file missing", lambda f, t: [
        "generate", "--model", f["policy"], "--prompts", str(t / "p.txt"), "--out",
        str(t / "o.jsonl")], 1, ["p.txt", "does not exist"]),
    ("generate: malformed jsonl row", lambda f, t: [
        "generate", "--model", f["policy"], "--prompts", f["gen_bad_jsonl"], "--out",
        str(t / "o.jsonl")], 1, ["line 2", "prompt"]),
]


@pytest.mark.parametrize("argv,code,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(argv, code, needles, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    got = cli.main(argv(files, tmp_path))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert got == code, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in needles:
        assert word in lines[0], (word, lines[0])


def test_there_are_at_least_twenty_kinds():
    assert len(CASES) >= 20
