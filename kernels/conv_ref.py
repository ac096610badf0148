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
    k, L = weight.shape[1], x.shape[-1]
    # K shifted multiply-adds instead of F.conv1d: same result, and on CPU the depthwise
    # convolution_backward is many times slower than the elementwise backward of this form.
    xp = F.pad(x, (k - 1, 0))
    w = weight.to(x.dtype)
    y = xp[..., :L] * w[:, :1]
    for j in range(1, k):
        y = y + xp[..., j : j + L] * w[:, j : j + 1]
    if bias is not None:
        y = y + bias.to(x.dtype)[:, None]
    return F.silu(y) if activation == "silu" else y
