"""The `rlhf-jax` entry point: its compilation-cache setting (`cli.compile_cache_dir`), its
first line without torch, and what a mistyped command line gets."""

import os
import pathlib
import subprocess
import sys

import pytest

from rlhf_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_jax_own_setting_wins(tmp_path):
    env = {"JAX_COMPILATION_CACHE_DIR": "/somewhere/jax", cli.CACHE_ENV: str(tmp_path)}
    assert cli.compile_cache_dir(env) == "/somewhere/jax"


@pytest.mark.parametrize("value", ["off", "OFF", "0", "none", ""])
def test_off_turns_the_cache_off(value):
    assert cli.compile_cache_dir({cli.CACHE_ENV: value}) is None


def test_named_directory_is_created(tmp_path):
    path = tmp_path / "a" / "b"
    assert cli.compile_cache_dir({cli.CACHE_ENV: str(path)}) == str(path)
    assert path.is_dir()


def test_default_is_under_the_user_cache_directory(tmp_path, monkeypatch):
    assert cli.compile_cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == str(
        tmp_path / "rlhf_jax" / "xla")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cli.compile_cache_dir({}) == str(tmp_path / "home" / ".cache" / "rlhf_jax" / "xla")


def test_unusable_directory_is_reported_and_the_command_goes_on(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli.compile_cache_dir({cli.CACHE_ENV: str(blocker / "xla")}) is None
    err = capsys.readouterr().err
    assert str(blocker / "xla") in err and cli.CACHE_ENV in err and "'off'" in err
    assert blocker.read_text() == "not a directory"  # nothing in the way was touched
    assert not os.path.exists(blocker / "xla")


@pytest.mark.parametrize("extra,expected", [
    ({}, f"{cli.CACHE_MAX_BYTES}"),
    ({"JAX_COMPILATION_CACHE_MAX_SIZE": "12345"}, "12345"),
])
def test_the_entry_point_points_jax_at_the_cache_with_a_size_cap(tmp_path, extra, expected):
    """In a fresh process (jax's settings are process-wide): the directory, and the cap,
    unless jax's own size setting is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update({cli.CACHE_ENV: str(tmp_path / "xla"), **extra})
    code = ("from rlhf_jax import cli; cli.use_compile_cache(); import jax; "
            "print(jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(tmp_path / "xla"), expected]


# ---------------------------------------------------------------------------------------------
# The first line a user sees, and what a mistyped command line gets.

ADVICE = "PyTorch was not found"
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None\n"  # as where torch is not installed
                 "from rlhf_jax import cli\n"
                 "code = cli.main(sys.argv[1:])\n"
                 "assert 'transformers' in sys.modules, 'the command never imported transformers'\n"
                 "sys.exit(code)\n")


def user_env(**extra):
    """The environment of a user who set nothing about transformers' messages."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    return {**env, **extra}


def test_no_pytorch_advice_where_torch_is_missing(ppo_inputs, tmp_path):
    # Without the entry point, importing transformers here does print it: the check can fail.
    bare = subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None; "
                           "import transformers"], capture_output=True, text=True, env=user_env(),
                          timeout=120)
    assert ADVICE in bare.stderr
    out = tmp_path / "completions.jsonl"
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, "generate", "--model", str(ppo_inputs / "policy"),
         "--prompts", str(ppo_inputs / "prompts.jsonl"), "--out", str(out),
         "--max-new-tokens", "2", "--batch-size", "40"],
        capture_output=True, text=True, env=user_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert ADVICE not in proc.stderr, proc.stderr
    assert len(out.read_text().splitlines()) == 40


def test_a_users_own_setting_of_the_advice_switch_is_kept():
    env = {"TRANSFORMERS_NO_ADVISORY_WARNINGS": ""}
    cli.quiet_advice(env)
    assert env == {"TRANSFORMERS_NO_ADVISORY_WARNINGS": ""}
    env = {}
    cli.quiet_advice(env)
    assert env == {"TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "rlhf_jax.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)


def test_a_flat_key_is_pointed_at_its_section():
    proc = run_cli("rm", "--config", "configs/rm_tiny.yaml", "learning_rate=1e-4")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "unknown config key 'learning_rate'; did you mean 'optim.learning_rate'? "
        "(write it as optim.learning_rate=0.0001)"), proc.stderr


@pytest.mark.parametrize("args, fix", [
    (["--steps", "5"], "write steps=5"),
    (["--optim.learning_rate=1e-4"], "write optim.learning_rate=1e-4"),
])
def test_an_option_is_answered_with_the_key_value_form(args, fix):
    proc = run_cli("rm", "--config", "configs/rm_tiny.yaml", *args)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "key=value, not as options" in last and last.endswith(fix), proc.stderr
    assert "Traceback" not in proc.stderr and "unrecognized arguments" not in proc.stderr
