"""Typed configs: YAML loading, dotted CLI overrides, strict validation with suggestions."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from models.config import ModelConfig
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


def _numeric_fields(cls, prefix=""):
    """(dotted key, field) of every int/float field in a config tree."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
        elif int in typing.get_args(tp) or float in typing.get_args(tp) or tp in (int, float):
            yield f"{prefix}{f.name}", f


def test_every_numeric_training_field_is_bounded_and_checked():
    """Each int/float key of the training config tree — and of every registered architecture's model section —
    carries bounds, and a value past them is refused naming the key (e.g. a negative warmup). Catches a new
    field (or a new architecture's) that accepts nonsense silently."""
    import dataclasses

    from models.registry import registered_archs
    from pretrain.config import TrainConfig, build_config

    fields = [(k, f, "mamba-tiny") for k, f in _numeric_fields(TrainConfig) if not k.startswith("model.")]
    for spec in registered_archs():
        preset = min(spec.presets, key=lambda name: ModelConfig.preset(name).d_model)
        fields += [(k, f, preset) for k, f in _numeric_fields(spec.config, "model.")]
    assert len(fields) > 40
    unbounded = [k for k, f, _ in fields if "bounds" not in f.metadata]
    assert unbounded == [], unbounded
    for key, f, preset in fields:
        bounds = f.metadata["bounds"]
        bad = bounds["gt"] if "gt" in bounds else bounds["ge"] - 1 if "ge" in bounds else \
            bounds["lt"] if "lt" in bounds else bounds["le"] + 1
        if f.default_factory is not dataclasses.MISSING:  # a list: one bad item among good ones
            bad = [*f.default_factory()[:1], bad]
        with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')} must be"):
            build_config({"model": {"preset": preset}}, {key: bad})
