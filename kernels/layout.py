"""Activation layouts: outputs and gradients are allocated in their input's memory layout.

The Mamba mixer's activations are (b, L, d) buffers (in_proj / x_proj outputs) seen as (b, d, L): channel-
contiguous. Kernels that keep that layout let the next matmul read their output without a transpose copy.
"""

from __future__ import annotations

import torch


def like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty (b, d, L) tensor in ``t``'s layout: channel-contiguous stays channel-contiguous."""
    b, d, L = t.shape
    if t.stride(1) <= t.stride(2) and d > 1:
        return torch.empty(b, L, d, device=t.device, dtype=dtype or t.dtype).transpose(1, 2)
    return torch.empty(b, d, L, device=t.device, dtype=dtype or t.dtype)
