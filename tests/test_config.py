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


# ---------------------------------------------------------------------------------------------
# Unknown keys point at the key the user most likely means, wherever it lives.


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Stage:
    steps: int = 10
    batch_size: int = 8
    optim: Optim = Optim()
    sampling: Optional[Sampling] = None
    export: bool = True


@pytest.mark.parametrize("overrides, message", [
    # a flat key (other trainers' spelling) is a leaf of a section here
    (["learning_rate=1e-4"], "unknown config key 'learning_rate'; did you mean "
                             "'optim.learning_rate'? (write it as optim.learning_rate=0.0001)"),
    (["lerning_rate=1e-4"], "unknown config key 'lerning_rate'; did you mean "
                            "'optim.learning_rate'? (write it as optim.learning_rate=0.0001)"),
    (["lr=3"], "unknown config key 'lr'; did you mean 'optim.learning_rate'? "
               "(write it as optim.learning_rate=3)"),
    # a leaf written under the wrong section, or inside a section the run does not set
    (["optim.steps=5"], "unknown config key 'optim.steps'; did you mean 'steps'? "
                        "(write it as steps=5)"),
    (["sampling.learning_rate=1"], "unknown config key 'sampling.learning_rate'; did you mean "
                                   "'optim.learning_rate'? (write it as optim.learning_rate=1)"),
    (["stop_ids=[1, 2]"], "unknown config key 'stop_ids'; did you mean 'sampling.stop_ids'? "
                          "(write it as sampling.stop_ids=[1, 2])"),
    (["max_steps=5"], "unknown config key 'max_steps'; did you mean 'steps'? "
                      "(write it as steps=5)"),
    # a misspelt sibling wins over a far leaf; a section is suggested without a value
    (["optim.warmup_step=3"], "unknown config key 'optim.warmup_step'; did you mean "
                              "'optim.warmup_steps'? (write it as optim.warmup_steps=3)"),
    (["optimm.learning_rate=1"], "unknown config key 'optimm'; did you mean 'optim'?"),
    (["zzz=1"], "unknown config key 'zzz'; valid keys: steps, batch_size, optim, sampling, export"),
    (["optim.zzz=1"], "unknown config key 'optim.zzz'; valid keys under 'optim': "
                      "learning_rate, warmup_steps"),
])
def test_unknown_keys_name_the_key_meant_and_how_to_write_it(overrides, message):
    with pytest.raises(ConfigError) as e:
        config.load(Stage, None, overrides)
    assert str(e.value) == message


def test_a_flat_key_in_a_yaml_file_is_pointed_at_its_section(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 3\nsampling:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"'sampling.temprature'; did you mean "
                                          r"'sampling.temperature'\?"):
        config.load(Stage, path)
    path.write_text("temperature: 0.5\n")
    with pytest.raises(ConfigError, match=r"did you mean 'sampling.temperature'\? "
                                          r"\(write it as sampling.temperature=0.5\)"):
        config.load(Stage, path)


def test_code_loading_keys_are_refused_at_any_level():
    for key in ("trust_remote_code=true", "optim.trust_remote_code=true"):
        with pytest.raises(ConfigError, match="asks to run code shipped with a model"):
            config.load(Stage, None, [key])


def test_key_types_lists_sections_and_leaves():
    assert list(config.key_types(Stage)) == [
        "steps", "batch_size", "optim", "optim.learning_rate", "optim.warmup_steps",
        "sampling", "sampling.temperature", "sampling.stop_ids", "export"]
    assert config.key_types(Stage)["sampling"] == Optional[Sampling]


@pytest.mark.parametrize("argv, line", [
    (["--steps", "5"], "write steps=5"),
    (["a=1", "--steps=5"], "write steps=5"),
    (["--optim.learning_rate", "1e-4"], "write optim.learning_rate=1e-4"),
    (["--learning_rate", "1e-4"], "write optim.learning_rate=1e-4"),
    (["--learning-rate=1e-4"], "write optim.learning_rate=1e-4"),
    (["--lr", "1e-4"], "write optim.learning_rate=1e-4"),
    (["--temprature", "0.7"], "write sampling.temperature=0.7"),
    (["--steps", "-5"], "write steps=-5"),
    (["--export"], "write export=true"),  # a flag names a boolean key
    (["--steps", "--export"], "write steps=VALUE"),
    (["--frobnicate", "3"], "'frobnicate' is no config key; valid keys: steps, batch_size, optim, "
                            "sampling, export"),
    (["-x"], "'x' is no config key"),
])
def test_options_are_answered_with_the_key_value_form(argv, line):
    error = config.option_error(argv, Stage)
    assert error.startswith("config keys are set as key=value, not as options: "), error
    assert error.endswith(line) if "write" in line else line in error, error


@pytest.mark.parametrize("argv", [
    [], ["steps=5", "optim.learning_rate=1e-4"], ["-h"], ["--help"],
    ["--config", "run.yaml", "steps=5"], ["--config=run.yaml"],
    ["--conf", "run.yaml"],  # argparse takes a prefix of an option
    ["steps=5", "--", "--not-an-option"],
])
def test_command_lines_without_stray_options_pass(argv):
    assert config.option_error(argv, Stage) is None


def test_an_override_that_is_not_yaml_says_to_quote_it():
    with pytest.raises(ConfigError) as e:
        config.parse_overrides(["data.train=[unclosed"])
    assert e.value.key == "data.train" and "data.train='[unclosed'" in str(e.value)
