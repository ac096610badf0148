"""Causal depthwise conv1d (+ SiLU) in plain PyTorch: the reference and the CPU path.

The Mamba mixer's short convolution (Gu & Dao 2023 §3.4): each channel sees only its own past K-1 inputs,
and with ``seq_idx`` only those of its own document (:mod:`kernels.documents`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels import documents


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = "silu", seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """x (b, d, L), weight (d, K), bias (d,) or None -> act(conv(x)) (b, d, L), left zero padding; with
    ``seq_idx`` (b, L) a tap reading another document's token reads 0 instead."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    k, L = weight.shape[1], x.shape[-1]
    # K shifted multiply-adds instead of F.conv1d: same result, and on CPU the depthwise
    # convolution_backward is many times slower than the elementwise backward of this form.
    xp = F.pad(x, (k - 1, 0))
    w = weight.to(x.dtype)
    def tap(j):  # x_{t - (k-1-j)} · w_j, masked to t's document
        term = xp[..., j : j + L] * w[:, j : j + 1]
        if seq_idx is None or j == k - 1:
            return term
        return term * documents.same_document(seq_idx, k - 1 - j)[:, None].to(term.dtype)

    y = tap(0)
    for j in range(1, k):
        y = y + tap(j)
    if bias is not None:
        y = y + bias.to(x.dtype)[:, None]
    return F.silu(y) if activation == "silu" else y
