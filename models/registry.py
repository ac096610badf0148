"""The architecture registry: one :class:`ArchSpec` per model architecture, looked up by ``model.arch``.

An entry holds everything the rest of the project needs to know about an architecture, so no module
branches on its name: the config class (the arch's own fields and validation, a ModelConfig subclass),
the LM class, named presets, the Hugging Face adapter (:class:`models.hf_adapter.HFAdapter`), the FLOP
and activation counters of ``polar plan`` and the ``polar info`` columns. Every field is required and
checked when the entry is registered, so an incomplete architecture fails at import, never at use.

Built-in entries are registered by :mod:`models.archs`. Architectures from outside the package register
themselves when imported as plugins (:mod:`models.plugins`); a lookup of an unknown name loads the plugins
before it gives up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from models.hf_adapter import HFAdapter
from models.plugins import ENV as PLUGINS_ENV
from models.plugins import load_plugins
from models.typed_config import ConfigError, from_dict


@dataclass(frozen=True)
class ArchSpec:
    """One architecture. ``title`` is its name in prose (model cards, ``polar info``); ``config`` is a
    ModelConfig subclass whose ``arch`` defaults to ``name``; ``model``
    builds the LM from such a config; ``presets`` maps preset names to config dicts (``arch`` is filled in);
    ``flops_per_token(cfg, seq_len)`` counts forward FLOPs per token (``seq_len``: the attention context, None
    to leave attention scores out); ``activations_per_token(cfg)`` counts the elements one token's forward pass
    keeps for backward, all layers; ``info_columns(cfg)`` gives ``polar info``'s arch-specific columns;
    ``add_polar_channels(state_dict, src_cfg, dst_cfg, generator)`` (optional: an architecture without polar
    channels has none) adds the polar channels ``dst_cfg`` has beyond ``src_cfg`` without changing the
    function (:mod:`models.polarize`)."""

    name: str
    title: str
    config: type
    model: Callable[[Any], nn.Module]
    presets: dict[str, dict[str, Any]]
    hf: HFAdapter
    flops_per_token: Callable[[Any, int | None], int]
    activations_per_token: Callable[[Any], int]
    info_columns: Callable[[Any], dict[str, str]]
    add_polar_channels: Callable[..., dict[str, Any]] | None = None

    def __post_init__(self):
        where = f"architecture {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise TypeError(f"{where}: name must be an identifier (it is model.arch in YAML)")
        fields = {f.name: f for f in dataclasses.fields(self.config)} if dataclasses.is_dataclass(self.config) else {}
        if fields.get("arch") is None or fields["arch"].default != self.name:
            raise TypeError(f"{where}: config must be a ModelConfig subclass whose arch defaults to {self.name!r}")
        if not isinstance(self.hf, HFAdapter):
            raise TypeError(f"{where}: hf must be an HFAdapter instance, got {type(self.hf).__name__}")
        for key in ("model", "flops_per_token", "activations_per_token", "info_columns"):
            if not callable(getattr(self, key)):
                raise TypeError(f"{where}: {key} must be callable")
        if self.add_polar_channels is not None and not callable(self.add_polar_channels):
            raise TypeError(f"{where}: add_polar_channels must be callable or None")


_ARCHS: dict[str, ArchSpec] = {}
PRESETS: dict[str, dict[str, Any]] = {}  # every registered preset, name -> config dict with its arch


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Add ``spec``; a second entry of the same name, a preset name already taken or a preset its config class
    refuses is an error (and leaves the registry as it was)."""
    if spec.name in _ARCHS:
        raise ValueError(f"architecture {spec.name!r} is already registered (by {_ARCHS[spec.name].config.__module__})")
    if taken := sorted(set(spec.presets) & set(PRESETS)):
        raise ValueError(f"architecture {spec.name!r}: presets {taken} are already registered")
    presets = {name: {"arch": spec.name, **preset} for name, preset in spec.presets.items()}
    _ARCHS[spec.name] = spec
    for name, preset in presets.items():
        try:
            from_dict(spec.config, preset, prefix="model")
        except ConfigError as e:
            del _ARCHS[spec.name]
            raise ConfigError(f"architecture {spec.name!r}, preset {name}: {e}") from e
    PRESETS.update(presets)
    return spec


def get_arch(name: str, where: str = "model.arch") -> ArchSpec:
    """The entry of ``name``; an unknown name is a one-line ConfigError listing the registered ones."""
    if name not in _ARCHS:
        load_plugins()
    if name not in _ARCHS:
        raise ConfigError(f"{where}: unknown architecture {name!r}; registered: {', '.join(sorted(_ARCHS))} "
                          f"(an architecture from a plugin needs {PLUGINS_ENV}=module)")
    return _ARCHS[name]


def registered_archs() -> list[ArchSpec]:
    return list(_ARCHS.values())
