"""Config machinery: YAML + overrides into typed frozen dataclasses, with errors that help."""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal, Optional

import pytest

from rlhf_jax import config
from rlhf_jax.config import ConfigError, check


class Estimator(str, enum.Enum):
    K1 = "k1"
    K3 = "k3"


@dataclasses.dataclass(frozen=True)
class Optim:
    learning_rate: float = 1e-5
    warmup_steps: int = 0

    def __post_init__(self):
        check(self.learning_rate > 0, "learning_rate", self.learning_rate, "a positive number")


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    optim: Optim = Optim()
    kl: Estimator = Estimator.K1
    mesh: tuple[int, int, int] = (1, -1, 1)
    stop_ids: tuple[int, ...] = ()
    side: Literal["left", "right"] = "left"
    limit: Optional[int] = None
    flag: bool = False


def test_round_trip_and_types(tmp_path):
    cfg = config.load(Run, None, ["name=x", "optim.learning_rate=1e-4", "kl=k3",
                                  "mesh=[2, 2, 2]", "stop_ids=[5, 7]", "limit=3", "flag=true"])
    assert cfg.optim.learning_rate == 1e-4 and isinstance(cfg.optim.learning_rate, float)
    assert cfg.kl is Estimator.K3 and cfg.mesh == (2, 2, 2) and cfg.stop_ids == (5, 7)
    path = tmp_path / "run.yaml"
    config.save_yaml(cfg, path)
    assert config.load(Run, path) == cfg
    assert config.from_dict(Run, config.to_dict(cfg)) == cfg
    # overrides win over the file
    assert config.load(Run, path, ["optim.warmup_steps=5"]).optim.warmup_steps == 5


@pytest.mark.parametrize("overrides, pattern", [
    (["name=x", "optim.lerning_rate=1"], r"unknown config key 'optim.lerning_rate'; did you mean 'optim.learning_rate'\?"),
    (["name=x", "optimm.learning_rate=1"], r"unknown config key 'optimm'; did you mean 'optim'\?"),
    (["name=x", "zzz=1"], r"unknown config key 'zzz'; valid keys: name, optim"),
    (["name=x", "optim.learning_rate=abc"], r"'optim.learning_rate' expects float, got 'abc' \(str\)"),
    (["name=x", "optim.warmup_steps=1.5"], r"'optim.warmup_steps' expects int"),
    (["name=x", "flag=1"], r"'flag' expects bool"),
    (["name=x", "kl=k2"], r"'kl' = 'k2' is not allowed: one of \['k1', 'k3'\]"),
    (["name=x", "side=up"], r"'side' = 'up' is not allowed"),
    (["name=x", "mesh=[1, 2]"], r"'mesh' expects 3 items"),
    (["name=x", "optim.learning_rate=-1"], r"config key 'optim.learning_rate' = -1.0 is not allowed: a positive number"),
    ([], r"config key 'name' is required"),
    (["name"], r"not of the form key.sub=value"),
])
def test_errors_name_the_key_and_the_fix(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config.load(Run, None, overrides)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim: [1,\n")
    with pytest.raises(ConfigError, match="line .* is not valid YAML"):
        config.load(Run, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        config.load(Run, listy)


def test_field_paths_lists_every_leaf():
    assert config.field_paths(Run) == ["name", "optim.learning_rate", "optim.warmup_steps", "kl",
                                       "mesh", "stop_ids", "side", "limit", "flag"]
