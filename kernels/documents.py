"""Document boundaries inside a packed window, as every kernel reads them (issue 25: ``data.document_boundaries``).

Pretraining packs documents end to end. A run with ``document_boundaries: reset`` gives the kernels ``seq_idx``:
an int tensor (batch, L), non-decreasing along L, the document index of each position (mamba_ssm's convention for
its Mamba-2 SSD and causal-conv1d kernels). Position t >= 1 starts a document when ``seq_idx[t] != seq_idx[t-1]``;
there every layer starts from a zero state: the SSM state is multiplied by 0 before the token's input is added
(a_t -> 0 in h_t = a_t·h_{t-1} + Δ_t B_t u_t, for every channel, the polar ones included) and the causal conv
sees no earlier tokens. Position 0 never resets: an initial state flows into the window's first document.
``seq_idx=None`` (``carry``) is the packed stream as mamba_ssm and the paper train it.
"""

from __future__ import annotations

import torch


def resets(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, L) bool: True where a position starts a new document (never at position 0)."""
    r = torch.zeros_like(seq_idx, dtype=torch.bool)
    r[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return r


def keep(seq_idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(b, L) in ``dtype``: 0 where the state is reset before the token, else 1 (the factor on a_t)."""
    return (~resets(seq_idx)).to(dtype)


def before_first_reset(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, L) bool: positions still in the window's first document (the ones an initial state reaches)."""
    return seq_idx == seq_idx[:, :1]


def same_document(seq_idx: torch.Tensor, shift: int) -> torch.Tensor:
    """(b, L) bool: position t - ``shift`` is in t's document (False before the window starts)."""
    out = torch.zeros_like(seq_idx, dtype=torch.bool)
    out[:, shift:] = seq_idx[:, shift:] == seq_idx[:, : seq_idx.shape[1] - shift]
    return out


def segmented_cumsum(x: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """Cumulative sum over the last axis restarted at every document start: x (..., L), seq_idx (b, L) with
    x's first axis b. The plain cumsum minus its value just before the position's document began."""
    total = torch.cumsum(x, dim=-1)
    start = torch.cummax(torch.where(resets(seq_idx), torch.arange(seq_idx.shape[1], device=x.device), 0), -1).values
    before = torch.cat([torch.zeros_like(total[..., :1]), total[..., :-1]], dim=-1)
    index = start.view(start.shape[0], *[1] * (x.dim() - 2), -1).expand_as(x)
    return total - torch.gather(before, -1, index)

