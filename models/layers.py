"""Layers and helpers every architecture shares: the fused residual-add norms, linear resets, and the
per-layer inference-state base whose ``repeat`` serves Mamba's recurrent state and the KV cache alike."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from kernels import dispatch


class RMSNorm(nn.Module):
    """Residual add + RMSNorm: normalised in fp32, cast to the stream dtype, times the weight (as
    transformers' MambaRMSNorm); also returns the new residual stream x + residual in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return dispatch.add_rmsnorm(x, residual, self.weight, self.eps)


class AddLayerNorm(nn.LayerNorm):
    """Residual add + LayerNorm with RMSNorm's interface: the final norm of the polarization paper's MQAR
    model (``model.final_norm: layernorm``; zoology's ``ln_f``), applied to the fp32 stream."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        stream = x.float() if residual is None else x.float() + residual.float()
        return super().forward(stream).to(x.dtype), stream


@torch.no_grad()
def reset_linears(*linears: nn.Linear) -> None:
    """PyTorch's default init for the weights, zero biases (mamba_ssm's projections)."""
    for lin in linears:
        lin.reset_parameters()
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)


@dataclasses.dataclass
class LayerStateBase:
    """A dataclass of per-sequence tensors (batch first) holding one layer's inference state."""

    def repeat(self, n: int):
        """Each sequence's state n times in a row (to score n continuations of one prompt)."""
        return type(self)(**{f.name: getattr(self, f.name).repeat_interleave(n, 0) for f in dataclasses.fields(self)})
