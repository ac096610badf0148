"""Causal depthwise conv1d (+ SiLU) in plain PyTorch: the reference and the CPU path.

The Mamba mixer's short convolution (Gu & Dao 2023 §3.4): each channel sees only its own past K-1 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = "silu") -> torch.Tensor:
    """x (b, d, L), weight (d, K), bias (d,) or None -> act(conv(x)) (b, d, L), left zero padding."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    d, k = weight.shape
    y = F.conv1d(x, weight[:, None, :].to(x.dtype), None if bias is None else bias.to(x.dtype),
                 padding=k - 1, groups=d)[..., : x.shape[-1]]
    return F.silu(y) if activation == "silu" else y
