"""Chunked linear + cross-entropy with Triton row kernels (the matmuls stay on cuBLAS).

Same autograd Function as :mod:`kernels.loss_ref`; only the per-chunk softmax maths is swapped: one
program per row streams the vocabulary in blocks with an online log-sum-exp (max and rescaled sum), and the
backward kernel overwrites the recomputed logits in place with (softmax - onehot) · scale, so a chunk's
logits are the only (tokens x vocab) buffer ever allocated. The kernels read the logits in the matmul's
dtype (bf16 under autocast), accumulate in fp32 and write bf16 dlogits: no fp32 copy of the logits, and the
same numbers as upcasting first (the reference's fp32 maths on the same bf16 logits, rounded the same way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import loss_ref
from kernels.triton_jit import jit


@jit
def _ce_fwd_kernel(logits_ptr, labels_ptr, loss_ptr, lse_ptr, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * V
    # lane-wise online log-sum-exp; a finite floor keeps never-touched lanes at exp(0) * 0, not nan
    m = tl.full((BLOCK_V,), -3.0e38, tl.float32)
    acc = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-3.0e38).to(tl.float32)
        m_new = tl.maximum(m, x)
        acc = acc * tl.exp(m - m_new) + tl.where(cols < V, tl.exp(x - m_new), 0.0)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(acc * tl.exp(m - m_row), axis=0))
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))


@jit
def _ce_bwd_kernel(logits_ptr, labels_ptr, lse_ptr, scale_ptr, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * V
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    scale = tl.where(label != ignore_index, tl.load(scale_ptr), 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)) * scale
        tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


class TritonChunkCE:
    """:class:`kernels.loss_ref.ChunkCE` with Triton row kernels."""

    block_v = 1024
    reads_low_precision = True

    @classmethod
    def forward(cls, logits, labels, ignore_index):
        logits = logits.contiguous()
        loss = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
        lse = torch.empty_like(loss)
        _ce_fwd_kernel[(logits.shape[0],)](logits, labels, loss, lse, logits.shape[1], ignore_index,
                                           BLOCK_V=min(cls.block_v, triton.next_power_of_2(logits.shape[1])))
        return loss, lse

    @classmethod
    def backward_(cls, logits, lse, labels, ignore_index, scale):
        assert logits.is_contiguous()
        _ce_bwd_kernel[(logits.shape[0],)](logits, labels, lse.contiguous(), scale.reshape(1), logits.shape[1],
                                           ignore_index,
                                           BLOCK_V=min(cls.block_v, triton.next_power_of_2(logits.shape[1])))
        return logits


def linear_cross_entropy(hidden, weight, labels, ignore_index=loss_ref.IGNORE_INDEX, chunk_size=1024):
    """hidden (T, d), weight (V, d), labels (T,) -> mean cross-entropy over non-ignored tokens (fp32)."""
    return loss_ref.linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size, ce=TritonChunkCE)
