"""A toy third architecture registered from outside the package, as a user's plugin would be: a gated linear
recurrence (a minimal GRU-like mixer, h_t = a ⊙ h_{t-1} + (1 - a) ⊙ W_in x_t, y_t = W_out (h_t ⊙ SiLU(W_g x_t)),
a = sigmoid(decay) per channel) with its own config section (``toy``), presets, cost counters and ``polar info``
columns, saving to a polar-only Hugging Face folder. Importing this module registers ``arch: toyrnn``;
``POLAR_PLUGINS=tests.toy_arch`` makes `polar` processes (and their workers) import it. No project file names it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import ModelConfig
from models.hf_adapter import PolarOnlyAdapter
from models.layers import LayerStateBase
from models.lm import CausalLM, Mixer, MixerBlock
from models.registry import ArchSpec, register_arch
from models.typed_config import ConfigError, bounded


@dataclass
class ToySection:
    hidden: int = bounded(32, gt=0)  # recurrent channels
    decay_init: float = bounded(0.9, gt=0, lt=1)  # a at init


@dataclass
class ToyConfig(ModelConfig):
    arch: str = "toyrnn"
    toy: ToySection = field(default_factory=ToySection)

    def __post_init__(self):
        super().__post_init__()
        if self.toy.hidden % 8:
            raise ConfigError(f"model.toy.hidden must be a multiple of 8, got {self.toy.hidden}")


@dataclass
class ToyState(LayerStateBase):
    h: torch.Tensor  # (batch, hidden)


class ToyMixer(Mixer):
    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg, h = cfg, cfg.toy.hidden
        self.in_proj = nn.Linear(cfg.d_model, 2 * h, bias=False)  # input and gate
        self.decay = nn.Parameter(torch.empty(h))
        self.out_proj = nn.Linear(h, cfg.d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        a = self.cfg.toy.decay_init
        self.decay.fill_(math.log(a / (1 - a)))  # sigmoid(decay) = a

    def forward(self, hidden: torch.Tensor, state: ToyState | None = None) -> torch.Tensor:
        u, gate = self.in_proj(hidden).chunk(2, dim=-1)
        a = torch.sigmoid(self.decay)
        h = torch.zeros_like(u[:, 0]) if state is None else state.h
        outs = []
        for t in range(u.shape[1]):
            h = a * h + (1 - a) * u[:, t]
            outs.append(h)
        if state is not None:
            state.h = h
        return self.out_proj(torch.stack(outs, 1) * F.silu(gate))

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> ToyState:
        return ToyState(torch.zeros(batch, self.cfg.toy.hidden, device=device, dtype=dtype))


class ToyLM(CausalLM):
    block = functools.partial(MixerBlock, mixer=ToyMixer)


def flops_per_token(cfg: ToyConfig, seq_len: int | None = None) -> int:
    d, h = cfg.d_model, cfg.toy.hidden
    return cfg.n_layer * (2 * d * 2 * h + 6 * h + 2 * h * d) + 2 * d * cfg.padded_vocab_size


def activations_per_token(cfg: ToyConfig) -> int:
    d, h = cfg.d_model, cfg.toy.hidden
    return cfg.n_layer * (2 * d + 6 * h) + 2 * d


SPEC = register_arch(ArchSpec(
    name="toyrnn", title="Toy RNN", config=ToyConfig, model=ToyLM, hf=PolarOnlyAdapter("toyrnn"),
    presets={"toyrnn-tiny": {"d_model": 32, "n_layer": 2, "vocab_size": 512, "toy": {"hidden": 16}}},
    flops_per_token=flops_per_token, activations_per_token=activations_per_token,
    info_columns=lambda cfg: {"hidden": str(cfg.toy.hidden)},
))
