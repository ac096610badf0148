"""Residual add + RMSNorm in plain PyTorch: the reference and the CPU path (mamba_ssm's fused add-norm).

new_residual = x + residual (fp32); normed = weight · cast(RMSNorm(new_residual)) where the norm is computed
in fp32 and cast to the stream's dtype before the weight, exactly as transformers' ``MambaRMSNorm``.
"""

from __future__ import annotations

import torch


def stream_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    """The dtype ``x + residual`` would have: what the normalised activations are cast to."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """x, residual (..., d) (residual may be None); weight (d,). Returns (normed, new_residual fp32)."""
    new_residual = x.float() if residual is None else x.float() + residual.float()
    normed = new_residual * torch.rsqrt(new_residual.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(stream_dtype(x, residual)), new_residual
