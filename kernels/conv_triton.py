"""Causal depthwise conv1d (+ SiLU) as Triton kernels, forward and backward (grads for x, weight, bias).

y[b, c, t] = act(bias[c] + Σ_j w[c, j] · x[b, c, t - (K-1) + j]), zero left padding (the Mamba mixer's
short convolution, Gu & Dao 2023 §3.4). One program per (batch, channel block, time block). The backward
recomputes the pre-activation instead of storing it; weight/bias grads are per-program partials summed in
PyTorch (deterministic). Outputs and gradients keep their input's layout (:mod:`kernels.layout`): the
mixer's channel-contiguous x gives a channel-contiguous y, which x_proj then reads without a copy. Same
results as :func:`kernels.conv_ref.causal_conv1d`.

Packed documents: with ``seq_idx`` (b, L) int (the document of every position, non-decreasing; mamba_ssm's and
causal_conv1d's convention) a tap contributes only when its source position is in the output position's document,
as if each document were convolved separately with zero left padding (forward and backward mask the same taps;
a constexpr flag, so the call without seq_idx compiles to the same kernel as before).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.layout import like
from kernels.triton_jit import jit

# the backward recomputes K shifted pre-activations per tile: smaller tiles than the forward's keep it free
# of register spills on sm_90 (benchmarks/compile_kernels.py)
_BWD_BLOCKS = (32, 32)


@triton.jit
def _same_doc(q_row, s_ql, src, doc, L):
    """True where position ``src`` is inside [0, L) and in document ``doc`` (seq_idx row ``q_row``)."""
    inside = (src >= 0) & (src < L)
    return inside & (tl.load(q_row + src * s_ql, mask=inside, other=0) == doc)


@jit(do_not_specialize=("s_qb",))
def _conv_fwd_kernel(
    x_ptr, w_ptr, b_ptr, q_ptr, y_ptr, d, L, s_xb, s_xd, s_xl, s_wd, s_wk, s_yb, s_yd, s_yl, s_qb, s_ql,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_b, pid_d, pid_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)  # int64: times the time stride
    mask_d = offs_d < d
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
    if HAS_SEQ_IDX:
        q_row = q_ptr + pid_b.to(tl.int64) * s_qb
        doc = tl.load(q_row + offs_l * s_ql, mask=offs_l < L, other=0)  # each output position's document
    for j in tl.static_range(K):
        src = offs_l - (K - 1) + j
        w = tl.load(w_ptr + offs_d * s_wd + j * s_wk, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_SEQ_IDX:
            tap = _same_doc(q_row, s_ql, src, doc, L)
        else:
            tap = (src >= 0) & (src < L)
        xv = tl.load(x_ptr + pid_b * s_xb + offs_d[:, None] * s_xd + src[None, :] * s_xl,
                     mask=mask_d[:, None] & tap[None, :], other=0.0)
        acc += w[:, None] * xv.to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_ptr + pid_b.to(tl.int64) * s_yb + offs_d[:, None] * s_yd + offs_l[None, :] * s_yl,
             acc.to(y_ptr.dtype.element_ty), mask=mask_d[:, None] & (offs_l < L)[None, :])


@jit(do_not_specialize=("s_qb",))
def _conv_bwd_kernel(
    x_ptr, w_ptr, b_ptr, q_ptr, gy_ptr, gx_ptr, gw_ptr, gb_ptr, batch, d, L, s_xb, s_xd, s_xl, s_wd, s_wk,
    s_gb, s_gd, s_gl, s_ob, s_od, s_ol, s_qb, s_ql,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_b, pid_d, pid_l = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_l = pid_l.to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)  # int64: times the time stride
    mask_d = offs_d < d
    x_rows = x_ptr + pid_b.to(tl.int64) * s_xb + offs_d[:, None] * s_xd
    gx = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_SEQ_IDX:
        q_row = q_ptr + pid_b.to(tl.int64) * s_qb
        doc = tl.load(q_row + offs_l * s_ql, mask=offs_l < L, other=0)  # this tile's positions' documents
    # gx[t] = Σ_s w[K-1-s] · gpre[t+s]: recompute the pre-activation at the K shifted positions t+s
    for s in tl.static_range(K):
        pos = offs_l + s
        pre = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
        if HAS_BIAS:
            pre += tl.load(b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[:, None]
        if HAS_SEQ_IDX:
            doc_pos = tl.load(q_row + pos * s_ql, mask=pos < L, other=0)
        for j in tl.static_range(K):
            src = pos - (K - 1) + j
            w = tl.load(w_ptr + offs_d * s_wd + j * s_wk, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_SEQ_IDX:
                tap = _same_doc(q_row, s_ql, src, doc_pos, L)
            else:
                tap = (src >= 0) & (src < L)
            xv = tl.load(x_rows + src[None, :] * s_xl, mask=mask_d[:, None] & tap[None, :], other=0.0)
            pre += w[:, None] * xv.to(tl.float32)
        valid = mask_d[:, None] & (pos < L)[None, :]
        if HAS_SEQ_IDX:  # t reaches t+s only inside one document
            valid = valid & _same_doc(q_row, s_ql, pos, doc, L)[None, :]
        gpre = tl.load(gy_ptr + pid_b.to(tl.int64) * s_gb + offs_d[:, None] * s_gd + pos[None, :] * s_gl, mask=valid,
                       other=0.0)
        gpre = gpre.to(tl.float32)
        if SILU:
            sig = tl.sigmoid(pre)
            gpre = gpre * sig * (1.0 + pre * (1.0 - sig))
        w_s = tl.load(w_ptr + offs_d * s_wd + (K - 1 - s) * s_wk, mask=mask_d, other=0.0).to(tl.float32)
        gx += w_s[:, None] * gpre
        if s == 0:  # this tile's own positions: weight and bias partials
            part = (pid_b * tl.num_programs(2) + pid_l) * d + offs_d
            if HAS_BIAS:
                tl.store(gb_ptr + part, tl.sum(gpre, axis=1), mask=mask_d)
            for j in tl.static_range(K):
                src = offs_l - (K - 1) + j
                if HAS_SEQ_IDX:
                    tap = _same_doc(q_row, s_ql, src, doc, L)
                else:
                    tap = (src >= 0) & (src < L)
                xv = tl.load(x_rows + src[None, :] * s_xl, mask=mask_d[:, None] & tap[None, :], other=0.0)
                tl.store(gw_ptr + part * K + j, tl.sum(gpre * xv.to(tl.float32), axis=1), mask=mask_d)
    tl.store(gx_ptr + pid_b.to(tl.int64) * s_ob + offs_d[:, None] * s_od + offs_l[None, :] * s_ol,
             gx.to(gx_ptr.dtype.element_ty), mask=mask_d[:, None] & (offs_l < L)[None, :])


def _strides2(t):
    return list(t.stride()) if t is not None else [0, 0]


def _launch_args(x, weight, block_d, block_l):
    b, d, L = x.shape
    block_d = block_d or min(64, max(triton.next_power_of_2(d), 2))
    block_l = block_l or min(64, max(triton.next_power_of_2(L), 2))
    grid = (b, triton.cdiv(d, block_d), triton.cdiv(L, block_l))
    return grid, (*x.stride(), *weight.stride()), dict(BLOCK_D=block_d, BLOCK_L=block_l)


class CausalConv1dTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, block_d, block_l, seq_idx=None):
        b, d, L = x.shape
        grid, strides, blocks = _launch_args(x, weight, block_d, block_l)
        flags = dict(K=weight.shape[1], HAS_BIAS=bias is not None, SILU=silu, HAS_SEQ_IDX=seq_idx is not None,
                     **blocks)
        y = like(x)
        _conv_fwd_kernel[grid](x, weight, bias, seq_idx, y, d, L, *strides, *y.stride(), *_strides2(seq_idx), **flags)
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.flags, ctx.blocks = flags, (block_d, block_l)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, seq_idx = ctx.saved_tensors
        b, d, L = x.shape
        gx = like(x)
        block_d, block_l = ctx.blocks
        grid, strides, blocks = _launch_args(x, weight, block_d or _BWD_BLOCKS[0], block_l or _BWD_BLOCKS[1])
        flags = dict(ctx.flags, **blocks)
        n_parts = b * grid[2]
        gw = torch.empty(n_parts, d, weight.shape[1], device=x.device, dtype=torch.float32)
        gb = torch.empty(n_parts, d, device=x.device, dtype=torch.float32) if bias is not None else None
        _conv_bwd_kernel[grid](x, weight, bias, seq_idx, gy, gx, gw, gb, b, d, L, *strides, *gy.stride(), *gx.stride(),
                               *_strides2(seq_idx), **flags)
        gbias = None if bias is None else gb.sum(0).to(bias.dtype)
        return gx, gw.sum(0).to(weight.dtype), gbias, None, None, None, None


def causal_conv1d(x, weight, bias=None, activation="silu", seq_idx=None, block_d=None, block_l=None):
    """x (b, d, L), weight (d, K), bias (d,) or None; activation "silu" or None; seq_idx (b, L) int or None (the
    document of every position: no tap crosses a document start). Returns y like x."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if seq_idx is not None:
        assert seq_idx.shape == (x.shape[0], x.shape[-1]), f"seq_idx {tuple(seq_idx.shape)}: want (batch, L)"
        seq_idx = seq_idx.to(device=x.device, dtype=torch.int32)
    return CausalConv1dTriton.apply(x, weight, bias, activation == "silu", block_d, block_l, seq_idx)
