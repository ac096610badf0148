"""What the state-space family (Mamba-1, Mamba-2) shares: its config sections, the recurrent layer state,
mamba_ssm's Δ initialisation and projection resets, and the row surgery that adds polar channels to trained
B/C weights (:func:`grow_channels`, used by each architecture's ``add_polar_channels``; models/polarize.py).

Polarization (Wang et al. 2025, §4): ``polarize.ones`` state channels whose transition is fixed at
A_t = 1 (never forget) and ``polarize.zeros`` channels fixed at A_t = 0 (no memory) are added beside
the ``ssm.d_state`` learned channels; B and C cover all of them, in the order [ones, learned, zeros].
``zero_mode: reference`` reproduces the paper's code, which realises the zero channel as A = -100.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn as nn

from models.config import ModelConfig
from models.layers import LayerStateBase, reset_linears
from models.typed_config import ConfigError, bounded


@dataclass
class PolarizeConfig:
    ones: int = bounded(0, ge=0)
    zeros: int = bounded(0, ge=0)
    zero_mode: Literal["exact", "reference"] = "exact"

    def __post_init__(self):
        if self.zero_mode not in ("exact", "reference"):
            raise ConfigError(f"polarize.zero_mode must be 'exact' or 'reference', got {self.zero_mode!r}")

    @property
    def enabled(self) -> bool:
        return self.ones > 0 or self.zeros > 0


@dataclass
class SSMConfig:
    """The ``ssm`` section's fields both Mamba generations have; each adds its own (MambaSSMConfig, ...)."""

    d_state: int = bounded(16, gt=0)  # N learned channels
    d_conv: int = bounded(4, gt=0)
    expand: int = bounded(2, gt=0)
    dt_min: float = bounded(1e-3, gt=0)
    dt_max: float = bounded(1e-1, gt=0)
    dt_init_floor: float = bounded(1e-4, gt=0)
    conv_bias: bool = True
    proj_bias: bool = False

    def __post_init__(self):
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"ssm.dt_min/dt_max must satisfy 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


@dataclass
class SSMModelConfig(ModelConfig):
    """A state-space LM's config: the shared fields plus ``ssm`` and ``polarize``."""

    INIT_ONLY = (*ModelConfig.INIT_ONLY, "ssm.dt_min", "ssm.dt_max", "ssm.dt_init_floor")
    ssm: SSMConfig = field(default_factory=SSMConfig)
    polarize: PolarizeConfig = field(default_factory=PolarizeConfig)

    @property
    def d_inner(self) -> int:
        return self.ssm.expand * self.d_model

    @property
    def d_state_total(self) -> int:
        """All state channels: ones + learned + zeros (the order B and C use)."""
        return self.polarize.ones + self.ssm.d_state + self.polarize.zeros

    def with_polarization(self, ones: int = 1, zeros: int = 1) -> SSMModelConfig:
        return replace(self, polarize=replace(self.polarize, ones=ones, zeros=zeros))


@dataclass
class LayerState(LayerStateBase):
    """Recurrent state of one SSM mixer: the last d_conv-1 conv inputs and the SSM state (fp32)."""

    conv: torch.Tensor  # (batch, conv channels, d_conv - 1)
    ssm: torch.Tensor  # (batch, ..., d_state_total)


def inverse_softplus_dt(n: int, s: SSMConfig) -> torch.Tensor:
    """mamba_ssm's Δ bias: the inverse softplus of Δ log-uniform in [dt_min, dt_max], floored at dt_init_floor,
    so softplus(bias) starts at that Δ."""
    dt = torch.exp(torch.rand(n) * (math.log(s.dt_max) - math.log(s.dt_min)) + math.log(s.dt_min))
    dt = dt.clamp(min=s.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


@torch.no_grad()
def reset_projections(mixer: nn.Module, cfg: SSMModelConfig, *linears: nn.Linear) -> None:
    """mamba_ssm's mixer init around the SSM parameters: PyTorch-default ``linears`` with zero biases and conv,
    out_proj rescaled by 1/sqrt(n_layer) (GPT-2's scheme, one residual per layer)."""
    reset_linears(*linears, mixer.out_proj)
    mixer.conv1d.reset_parameters()
    if cfg.rescale_prenorm_residual:
        mixer.out_proj.weight /= math.sqrt(cfg.n_layer)


Fill = Callable[[torch.Tensor, int], torch.Tensor]


def grow_channels(t: torch.Tensor, src: SSMModelConfig, dst: SSMModelConfig, start: int, groups: int,
                  fill_ones: Fill, fill_zeros: Fill) -> torch.Tensor:
    """``t`` with its ``groups`` blocks of ``src.d_state_total`` state channels (along dim 0, from row ``start``)
    widened to ``dst``'s: each block's source channels stay in order and the new ones channels go first, the
    new zeros channels last (the [ones, learned, zeros] layout). ``fill_*(learned, n)`` gives the n new rows
    from the block's learned-channel rows."""
    ns, n = src.d_state_total, src.ssm.d_state
    learned = slice(src.polarize.ones, src.polarize.ones + n)
    parts = [t[:start]]
    for g in range(groups):
        block = t[start + g * ns : start + (g + 1) * ns]
        parts += [fill_ones(block[learned], dst.polarize.ones - src.polarize.ones), block,
                  fill_zeros(block[learned], dst.polarize.zeros - src.polarize.zeros)]
    return torch.cat([*parts, t[start + groups * ns :]])


def zero_rows(learned: torch.Tensor, n: int) -> torch.Tensor:
    return learned.new_zeros(n, *learned.shape[1:])


def mean_rows(learned: torch.Tensor, n: int) -> torch.Tensor:
    """n copies of the learned channels' mean row (e.g. their average conv filter)."""
    return learned.mean(0, keepdim=True).expand(n, *learned.shape[1:])


def random_rows(generator: torch.Generator) -> Fill:
    """Rows N(0, s²) with s the RMS of the learned channels' rows: new inputs on the trained channels' scale."""
    def fill(learned: torch.Tensor, n: int) -> torch.Tensor:
        rms = learned.float().pow(2).mean().sqrt()
        return (torch.randn(n, *learned.shape[1:], generator=generator) * rms).to(learned.dtype)
    return fill
