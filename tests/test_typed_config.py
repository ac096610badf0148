"""Typed configs: YAML loading, dotted CLI overrides, strict validation with suggestions."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from models.typed_config import ConfigError, apply_overrides, from_dict, load_yaml, parse_override_args


@dataclass
class Optim:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])


@dataclass
class Root:
    name: str = "run"
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    seed: int | None = None
    optim: Optim = field(default_factory=Optim)


def test_overrides_parse_with_yaml_types():
    got = parse_override_args(["--optim.lr", "3e-4", "--steps=20", "--mode", "b", "--optim.betas", "[0.8, 0.9]"])
    assert got == {"optim.lr": 3e-4, "steps": 20, "mode": "b", "optim.betas": [0.8, 0.9]}
    cfg = from_dict(Root, apply_overrides({"name": "x"}, got))
    assert cfg.optim.lr == 3e-4 and cfg.steps == 20 and cfg.optim.betas == [0.8, 0.9] and cfg.name == "x"


def test_int_accepted_for_float_and_none_for_optional():
    cfg = from_dict(Root, {"optim": {"lr": 1}, "seed": None})
    assert isinstance(cfg.optim.lr, float) and cfg.seed is None


@pytest.mark.parametrize(
    "data,match",
    [
        ({"optim": {"lrr": 1.0}}, "unknown config key 'optim.lrr': did you mean 'lr'"),
        ({"steps": "ten"}, "steps: expected an integer"),
        ({"mode": "c"}, "mode: 'c' is not one of"),
        ({"optim": 3}, "optim: expected a mapping"),
    ],
)
def test_validation_errors(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(Root, data)


def test_override_arg_errors():
    with pytest.raises(ConfigError, match="has no value"):
        parse_override_args(["--optim.lr"])
    with pytest.raises(ConfigError, match="overrides look like"):
        parse_override_args(["lr", "1"])


def test_load_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    good = tmp_path / "good.yaml"
    good.write_text("steps: 5\noptim:\n  lr: 0.1\n")
    assert from_dict(Root, load_yaml(good)).optim.lr == 0.1
