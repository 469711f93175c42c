"""The `rlhf-jax` entry point's compilation-cache setting (`cli.compile_cache_dir`)."""

import os
import subprocess
import sys

import pytest

from rlhf_jax import cli


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
