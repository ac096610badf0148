"""The Mamba-2 language model (Dao & Gu 2024, SSD), baseline and polarized, on the LM skeleton.

Its config (:class:`Mamba2Config`) and mixer: in_proj -> [z, x, B, C, Δ] -> causal depthwise conv + SiLU
over x, B and C -> SSD scan (one scalar decay per head, x split into heads of ``head_dim`` channels, B and C
shared by ``n_groups`` groups of heads, D skip) -> gated RMSNorm of y·SiLU(z) per group -> out_proj. Blocks,
backbone, head, loss and decoding are the skeleton's (:mod:`models.lm`). Parameter names and semantics are
transformers' ``Mamba2ForCausalLM`` (``mixer.{in_proj, conv1d, dt_bias, A_log, D, norm.weight, out_proj}``),
so a baseline's state dict loads there unchanged (:mod:`models.hf_mamba2`).

Polarization: each head gets ``polarize.ones`` state channels with A_t ≡ 1 and ``polarize.zeros`` with
A_t ≡ 0 beside its N learned ones; B and C gain those columns (in_proj and conv1d grow by 2·n_groups per
extra channel), and the SSD op adds them in closed form around any SSD backend (:mod:`kernels.ssd_ref`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import dispatch
from models.lm import CausalLM, Mixer, MixerBlock
from models.ssm import (
    LayerState,
    SSMConfig,
    SSMModelConfig,
    grow_channels,
    inverse_softplus_dt,
    mean_rows,
    random_rows,
    reset_projections,
    zero_rows,
)
from models.typed_config import ConfigError, bounded

A_INIT_RANGE = (1.0, 16.0)  # mamba_ssm's Mamba2: A = -U(1, 16) per head


@dataclass
class Mamba2SSMConfig(SSMConfig):
    # d_inner = n_heads x head_dim; B and C are shared by n_groups groups of heads; chunk_size is the SSD
    # algorithm's block length.
    head_dim: int = bounded(64, gt=0)
    n_groups: int = bounded(1, gt=0)
    chunk_size: int = bounded(256, gt=0)


@dataclass
class Mamba2Config(SSMModelConfig):
    arch: str = "mamba2"
    ssm: Mamba2SSMConfig = field(default_factory=Mamba2SSMConfig)

    def __post_init__(self):
        super().__post_init__()
        if self.d_inner % self.ssm.head_dim or self.n_heads % self.ssm.n_groups:
            raise ConfigError(f"mamba2: ssm.head_dim must divide expand x d_model = {self.d_inner} into heads and "
                              f"ssm.n_groups must divide the heads, got head_dim={self.ssm.head_dim}, "
                              f"n_groups={self.ssm.n_groups}")
        if self.polarize.zeros and self.polarize.zero_mode == "reference":
            raise ConfigError("polarize.zero_mode: reference (A = -100) is Mamba-1's paper code; "
                              "use zero_mode: exact with arch: mamba2")

    @property
    def n_heads(self) -> int:
        """Heads, each with one scalar decay."""
        return self.d_inner // self.ssm.head_dim


class GatedRMSNorm(nn.Module):
    """RMSNorm of y·SiLU(z) over each group of channels, in fp32, cast back, times the weight (transformers'
    ``MambaRMSNormGated``; mamba_ssm's ``RMSNormGated`` with norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = (y.float() * F.silu(z.float())).unflatten(-1, (-1, self.group_size))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.flatten(-2).to(y.dtype)


class Mamba2Mixer(Mixer):
    """One SSD layer: in_proj -> conv + SiLU over (x, B, C) -> SSD per head -> gated RMSNorm -> out_proj."""

    document_resets = True

    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        s = cfg.ssm
        self.n_heads, self.head_dim, self.n_groups = cfg.n_heads, s.head_dim, s.n_groups
        self.n_ones, self.n_zeros = cfg.polarize.ones, cfg.polarize.zeros
        di, self.bc_dim = cfg.d_inner, s.n_groups * cfg.d_state_total
        self.conv_dim = di + 2 * self.bc_dim
        self.in_proj = nn.Linear(cfg.d_model, di + self.conv_dim + self.n_heads, bias=s.proj_bias)  # z, xBC, Δ
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, s.d_conv, groups=self.conv_dim, padding=s.d_conv - 1,
                                bias=s.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))  # A = -exp(A_log): one decay per head, learned channels
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(di, di // s.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(di, cfg.d_model, bias=s.proj_bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's Mamba-2 initialisation: PyTorch-default projections and conv with zero biases, out_proj
        rescaled by 1/sqrt(n_layer), gate norm 1, A ~ U(1, 16), D = 1, Δ bias the inverse softplus of a
        log-uniform Δ in [dt_min, dt_max] (floored), per head."""
        reset_projections(self, self.cfg, self.in_proj)
        self.norm.weight.fill_(1.0)
        self.A_log.copy_(torch.log(torch.empty(self.n_heads).uniform_(*A_INIT_RANGE)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(inverse_softplus_dt(self.n_heads, self.cfg.ssm))

    def kernel_parameters(self) -> list[nn.Parameter]:
        """conv1d's weights go to the conv kernel directly."""
        return list(self.conv1d.parameters())

    def forward(self, hidden: torch.Tensor, state: LayerState | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (b, L, d_model). With ``state``, the input continues it (one token: a recurrent step;
        more: a chunked prefill from the carried state) and leaves its final state there. ``seq_idx`` (b, L):
        the conv and the SSD reset at every packed document's first token."""
        b, L, _ = hidden.shape
        k = self.cfg.ssm.d_conv
        z, xBC, dt = self.in_proj(hidden).split([self.cfg.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xBC = xBC.transpose(1, 2)  # (b, conv_dim, L)
        if state is not None:  # the conv continues from the cached inputs
            xBC = torch.cat([state.conv.to(xBC.dtype), xBC], dim=-1)
            state.conv.copy_(xBC[..., -(k - 1) :])
        if state is not None and seq_idx is not None:
            seq_idx = torch.cat([seq_idx[:, :1].expand(-1, k - 1), seq_idx], dim=1)  # the cache is in document 0
        xBC = dispatch.causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
                                     seq_idx=seq_idx)
        if state is not None:
            xBC = xBC[..., k - 1 :]
            seq_idx = None if seq_idx is None else seq_idx[:, k - 1 :]
        x, B, C = xBC.transpose(1, 2).split([self.cfg.d_inner, self.bc_dim, self.bc_dim], dim=-1)
        x = x.reshape(b, L, self.n_heads, self.head_dim)
        B, C = (t.reshape(b, L, self.n_groups, -1) for t in (B, C))
        kw = dict(A=-torch.exp(self.A_log.float()), D=self.D.float(), dt_bias=self.dt_bias.float(), dt_softplus=True,
                  n_ones=self.n_ones, n_zeros=self.n_zeros)
        if state is not None and L == 1:
            y, state.ssm = dispatch.ssd_step(state.ssm, x[:, 0], dt[:, 0], B=B[:, 0], C=C[:, 0], **kw)
        else:
            y = dispatch.ssd(x, dt, B=B, C=C, initial_state=None if state is None else state.ssm,
                             return_final_state=state is not None, chunk_size=self.cfg.ssm.chunk_size,
                             seq_idx=seq_idx, **kw)
            if state is not None:
                y, state.ssm = y
        return self.out_proj(self.norm(y.reshape(b, L, -1), z))

    def transitions(self, hidden: torch.Tensor) -> torch.Tensor:
        """A_t = exp(Δ_t·A) of each head's learned channels (b, L, n_heads) for mixer input ``hidden`` (diagnostics)."""
        dt = self.in_proj(hidden)[..., -self.n_heads :].float() + self.dt_bias.float()
        return torch.exp(F.softplus(dt) * -torch.exp(self.A_log.float()))

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerState:
        """The last d_conv-1 inputs of the conv over (x, B, C) and the SSD state (b, heads, head_dim, N_total)."""
        return LayerState(
            conv=torch.zeros(batch, self.conv_dim, self.cfg.ssm.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.n_heads, self.head_dim, self.cfg.d_state_total, device=device,
                            dtype=torch.float32),
        )


class Mamba2LM(CausalLM):
    """Mamba-2 language model: the skeleton over pre-norm blocks of :class:`Mamba2Mixer`."""

    block = functools.partial(MixerBlock, mixer=Mamba2Mixer)


def add_polar_channels(sd: dict[str, torch.Tensor], src: Mamba2Config, dst: Mamba2Config,
                       generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``sd`` (a ``src`` model's) with ``dst``'s extra polar channels in every B/C group (models/polarize.py has
    the why). in_proj: the new B rows drawn on the scale of the learned B rows, the new C rows (and biases)
    zero. conv1d: every new channel gets the mean filter of its group's learned B (or C) channels, the new B
    channels their mean bias and the new C channels bias 0, so C = SiLU(conv(0) + 0) = 0 exactly while
    dC/d(in_proj row) = SiLU'(0)·filter is not zero."""
    out = dict(sd)
    di, g, bc = src.d_inner, src.ssm.n_groups, src.ssm.n_groups * src.d_state_total
    rand = random_rows(generator)
    for key in sd:
        if key.endswith(("mixer.in_proj.weight", "mixer.in_proj.bias")):
            b, c, fill_b, fill_c = 2 * di, 2 * di + bc, rand, zero_rows
        elif key.endswith("mixer.conv1d.weight"):
            b, c, fill_b, fill_c = di, di + bc, mean_rows, mean_rows
        elif key.endswith("mixer.conv1d.bias"):
            b, c, fill_b, fill_c = di, di + bc, mean_rows, zero_rows
        else:
            continue
        t = grow_channels(sd[key], src, dst, c, g, fill_c, fill_c)  # C first: B's growth moves it
        out[key] = grow_channels(t, src, dst, b, g, fill_b, fill_b)
    return out
