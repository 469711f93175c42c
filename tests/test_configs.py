"""Every YAML in configs/ loads into the config class of the command its first line names."""

import importlib
import pathlib
import re

import pytest

from rlhf_jax import cli, config

CONFIGS = sorted((pathlib.Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_its_command(path):
    first = path.read_text().splitlines()[0]
    m = re.match(r"# rlhf-jax (\w+) .*--config (\S+)", first)
    assert m, f"{path.name}: first line must be the command that runs it, got {first!r}"
    command, named = m.groups()
    assert named == f"configs/{path.name}"
    module = importlib.import_module(cli.COMMANDS[command][0])
    cfg = config.load(module.CONFIG_CLASS, path)
    assert config.from_dict(module.CONFIG_CLASS, config.to_dict(cfg)) == cfg


def test_every_command_module_has_a_cli():
    import importlib

    from rlhf_jax.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        assert callable(importlib.import_module(module).cli), name
