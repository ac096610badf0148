"""The Mamba language model (Gu & Dao 2023), baseline and polarized (Wang et al. 2025), in plain PyTorch.

Its config (:class:`MambaConfig`: the SSM family's ``ssm``/``polarize`` plus ``dt_rank`` and ``init``) and its
mixer (one selective-SSM layer); embedding, blocks, final norm, head, loss and decoding are the skeleton's
(:mod:`models.lm`). Parameter names follow transformers' ``MambaForCausalLM`` so state dicts move between
the two without renaming. The conv and the scan go through :mod:`kernels.dispatch`, which picks the fastest
backend for the device (fused CUDA/Triton kernels on GPU, PyTorch on CPU).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Literal

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
    random_rows,
    reset_projections,
    zero_rows,
)
from models.typed_config import ConfigError, bounded


@dataclass
class MambaSSMConfig(SSMConfig):
    dt_rank: int | Literal["auto"] = bounded("auto", gt=0)  # auto: ceil(d_model / 16)


@dataclass
class MambaConfig(SSMModelConfig):
    INIT_ONLY = (*SSMModelConfig.INIT_ONLY, "init")
    arch: str = "mamba"
    ssm: MambaSSMConfig = field(default_factory=MambaSSMConfig)
    # mamba_ssm: its init (Δ from [dt_min, dt_max]). zoology: the polarization paper's MQAR code
    # (every Linear N(0, initializer_range), every bias 0 incl. dt_proj's so Δ starts at softplus(0),
    # out_proj N(0, initializer_range / sqrt(2 n_layer))); MambaMixer.reset_parameters.
    init: Literal["mamba_ssm", "zoology"] = "mamba_ssm"

    def __post_init__(self):
        super().__post_init__()
        if self.init not in ("mamba_ssm", "zoology"):
            raise ConfigError(f"model.init must be mamba_ssm|zoology, got {self.init!r}")

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.ssm.dt_rank == "auto" else self.ssm.dt_rank


class MambaMixer(Mixer):
    """One selective SSM layer: in_proj -> causal conv + SiLU -> x_proj -> Δ, B, C -> scan -> gate -> out_proj."""

    document_resets = True

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.cfg = cfg
        d, di, k = cfg.d_model, cfg.d_inner, cfg.ssm.d_conv
        self.n_ones, self.n_zeros = cfg.polarize.ones, cfg.polarize.zeros
        self.in_proj = nn.Linear(d, 2 * di, bias=cfg.ssm.proj_bias)
        self.conv1d = nn.Conv1d(di, di, k, groups=di, padding=k - 1, bias=cfg.ssm.conv_bias)
        self.x_proj = nn.Linear(di, cfg.dt_rank + 2 * cfg.d_state_total, bias=False)
        self.dt_proj = nn.Linear(cfg.dt_rank, di, bias=True)
        # A = -exp(A_log) for the N learned channels only; polar channels have no parameter.
        self.A_log = nn.Parameter(torch.empty(di, cfg.ssm.d_state))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = nn.Linear(di, d, bias=cfg.ssm.proj_bias)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """mamba_ssm's initialisation: PyTorch-default projections and conv with zero biases, out_proj rescaled
        by 1/sqrt(n_layer), S4D-real A and Δ (Gu & Dao 2023, §3.6)."""
        cfg, s = self.cfg, self.cfg.ssm
        reset_projections(self, cfg, self.in_proj, self.x_proj)
        std = cfg.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        self.dt_proj.bias.copy_(inverse_softplus_dt(cfg.d_inner, s))
        self.A_log.copy_(torch.log(torch.arange(1, s.d_state + 1, dtype=torch.float32)).repeat(cfg.d_inner, 1))
        self.D.fill_(1.0)

    @torch.no_grad()
    def zoology_init(self) -> None:
        """The polarization paper's MQAR init (its model's ``_init_weights``, applied over every module):
        every Linear N(0, initializer_range) with zero bias -- dt_proj's too, so Δ starts at softplus(0)
        = ln 2 -- and out_proj N(0, initializer_range / sqrt(2 n_layer)). Conv, A_log and D keep the
        mamba_ssm init; a tied head is the embedding."""
        std = self.cfg.initializer_range
        for lin in (self.in_proj, self.x_proj, self.dt_proj, self.out_proj):
            nn.init.normal_(lin.weight, std=std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if self.cfg.rescale_prenorm_residual:
            self.out_proj.weight /= math.sqrt(2 * self.cfg.n_layer)

    def kernel_parameters(self) -> list[nn.Parameter]:
        """dt_proj's and conv1d's weights go to the scan and conv kernels directly."""
        return [*self.dt_proj.parameters(), *self.conv1d.parameters()]

    def _ssm_inputs(self, x: torch.Tensor):
        """From conv output x (b, L, d_inner): Δ before bias (b, d_inner, L), B and C (b, N_total, L)."""
        dt, B, C = self.x_proj(x).split([self.cfg.dt_rank, self.cfg.d_state_total, self.cfg.d_state_total], -1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # the bias is added in fp32 by the scan
        return dt, B.transpose(1, 2), C.transpose(1, 2)

    def _scan_kwargs(self):
        return dict(
            A=-torch.exp(self.A_log.float()),
            D=self.D.float(),
            n_ones=self.n_ones,
            n_zeros=self.n_zeros,
            zero_mode=self.cfg.polarize.zero_mode,
        )

    def forward(self, hidden: torch.Tensor, state: LayerState | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: (b, L, d_model). With ``state``, a single token (L == 1) is one recurrent step and a
        longer input is a parallel prefill that continues from ``state`` and leaves its final state there
        (so a long prompt can be prefilled chunk by chunk in constant memory). ``seq_idx`` (b, L): the conv
        and the scan reset at every packed document's first token."""
        L = hidden.shape[1]
        # (b, d_inner, L) views of in_proj's (b, L, 2 d_inner) output; split on the last dim so the backward
        # joins the two gradients into one contiguous (b, L, 2 d_inner) tensor for in_proj (no transpose copy)
        x, z = (t.transpose(1, 2) for t in self.in_proj(hidden).chunk(2, dim=-1))
        if state is not None and L == 1:
            return self.out_proj(self._step(x[..., 0], z[..., 0], state)[:, None])
        h0 = None
        if state is not None:  # the conv continues from the cached inputs; a zero state adds nothing to the scan
            k = self.cfg.ssm.d_conv
            x = torch.cat([state.conv.to(x.dtype), x], dim=-1)
            state.conv.copy_(x[..., -(k - 1) :])
            h0 = state.ssm if bool(state.ssm.any()) else None
        if state is not None and seq_idx is not None:
            seq_idx = torch.cat([seq_idx[:, :1].expand(-1, k - 1), seq_idx], dim=1)  # the cache is in document 0
        x = dispatch.causal_conv1d(x, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu", seq_idx=seq_idx)
        if state is not None:
            x = x[..., k - 1 :]
            seq_idx = None if seq_idx is None else seq_idx[:, k - 1 :]
        dt, B, C = self._ssm_inputs(x.transpose(1, 2))
        out = dispatch.selective_scan(
            x, dt, B=B, C=C, z=z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
            return_last_state=state is not None, initial_state=h0, seq_idx=seq_idx, **self._scan_kwargs(),
        )
        if state is not None:
            out, state.ssm = out
        return self.out_proj(out.transpose(1, 2))

    def _step(self, x: torch.Tensor, z: torch.Tensor, state: LayerState) -> torch.Tensor:
        """One token: x, z (b, d_inner). Updates ``state`` in place; returns y (b, d_inner)."""
        window = torch.cat([state.conv, x[..., None]], dim=-1)  # (b, d_inner, d_conv)
        state.conv.copy_(window[..., 1:])
        x = (window * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        dt, B, C = self._ssm_inputs(x[:, None])
        y, state.ssm = dispatch.selective_step(
            state.ssm, x, dt[..., 0], B=B[..., 0], C=C[..., 0], z=z,
            dt_bias=self.dt_proj.bias.float(), dt_softplus=True, **self._scan_kwargs(),
        )
        return y

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> LayerState:
        di = self.cfg.d_inner
        return LayerState(
            conv=torch.zeros(batch, di, self.cfg.ssm.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, di, self.cfg.d_state_total, device=device, dtype=torch.float32),
        )


class MambaLM(CausalLM):
    """Mamba language model: the skeleton over pre-norm blocks of :class:`MambaMixer`."""

    block = functools.partial(MixerBlock, mixer=MambaMixer)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The skeleton's init (mamba_ssm's in every mixer), then, with ``init: zoology``, the paper's MQAR init
        over all layers (a second pass, as its ``_init_weights`` runs after the modules are built)."""
        super().reset_parameters()
        if self.config.init == "zoology":
            for layer in self.backbone.layers:
                layer.mixer.zoology_init()


def add_polar_channels(sd: dict[str, torch.Tensor], src: MambaConfig, dst: MambaConfig,
                       generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``sd`` (a ``src`` model's) with ``dst``'s extra polar channels (models/polarize.py has the why): x_proj
    gains their B rows, drawn on the scale of the learned channels' B rows, and all-zero C rows."""
    out = dict(sd)
    r, ns = src.dt_rank, src.d_state_total
    for key in (k for k in sd if k.endswith("mixer.x_proj.weight")):
        w = grow_channels(sd[key], src, dst, r + ns, 1, zero_rows, zero_rows)  # C first: B's growth moves it
        out[key] = grow_channels(w, src, dst, r, 1, random_rows(generator), random_rows(generator))
    return out
