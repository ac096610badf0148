"""Residual add + RMSNorm as Triton kernels, forward and backward (grads for x, residual and weight).

Same contract as :func:`kernels.norm_ref.add_rmsnorm`: the sum x + residual is formed and returned in fp32,
normalised in fp32, rounded to the stream dtype, then scaled by the weight. One program per block of rows
holds whole rows (BLOCK_D >= d); the backward reuses the saved fp32 residual and 1/rms, and writes the
weight gradient as per-program partials summed in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.norm_ref import stream_dtype
from kernels.triton_jit import jit

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@jit
def _add_rmsnorm_fwd_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_ptr, rstd_ptr, T, d, eps,
    HAS_RES: tl.constexpr, STREAM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: rows * d may pass 2^31
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (cols < d)[None, :]
    offs = rows[:, None] * d + cols[None, :]
    s = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_ptr + offs, s, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / d + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rows < T)
    normed = (s * rstd[:, None]).to(STREAM).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (normed * w[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@jit
def _add_rmsnorm_bwd_kernel(
    g_ptr, gres_ptr, res_ptr, rstd_ptr, w_ptr, gx_ptr, gr_ptr, gw_ptr, T, d,
    HAS_GRES: tl.constexpr, HAS_RES: tl.constexpr, STREAM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: rows * d may pass 2^31
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < T)[:, None] & (cols < d)[None, :]
    offs = rows[:, None] * d + cols[None, :]
    s = tl.load(res_ptr + offs, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rows < T, other=0.0)
    n = s * rstd[:, None]
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)
    tl.store(gw_ptr + tl.program_id(0) * d + cols, tl.sum(g * n.to(STREAM).to(tl.float32), axis=0), mask=cols < d)
    gn = g * w[None, :]
    gs = rstd[:, None] * (gn - n * (tl.sum(gn * n, axis=1) / d)[:, None])  # d/ds of s / rms(s)
    if HAS_GRES:
        gs += tl.load(gres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(gx_ptr + offs, gs.to(gx_ptr.dtype.element_ty), mask=mask)
    if HAS_RES:
        tl.store(gr_ptr + offs, gs.to(gr_ptr.dtype.element_ty), mask=mask)


def _blocks(d: int) -> tuple[int, int]:
    block_d = max(triton.next_power_of_2(d), 2)
    return max(1, min(16, 4096 // block_d)), block_d


class AddRMSNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape, d = x.shape, x.shape[-1]
        x2 = x.reshape(-1, d).contiguous()
        r2 = residual.reshape(-1, d).contiguous() if residual is not None else None
        T = x2.shape[0]
        stream = stream_dtype(x, residual)
        out = torch.empty(T, d, device=x.device, dtype=torch.promote_types(weight.dtype, stream))
        res = torch.empty(T, d, device=x.device, dtype=torch.float32)
        rstd = torch.empty(T, device=x.device, dtype=torch.float32)
        block_t, block_d = _blocks(d)
        flags = dict(STREAM=_TL_DTYPES[stream], BLOCK_T=block_t, BLOCK_D=block_d)
        _add_rmsnorm_fwd_kernel[(triton.cdiv(T, block_t),)](
            x2, r2, weight, out, res, rstd, T, d, eps, HAS_RES=residual is not None, **flags)
        ctx.save_for_backward(res, rstd, weight)
        ctx.flags, ctx.shape = flags, shape
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype)
        ctx.set_materialize_grads(False)
        return out.reshape(shape), res.reshape(shape)

    @staticmethod
    def backward(ctx, g, gres):
        res, rstd, weight = ctx.saved_tensors
        T, d = res.shape
        x_dtype, r_dtype = ctx.dtypes
        g = torch.zeros_like(res) if g is None else g.reshape(T, d).contiguous()
        gres = None if gres is None else gres.reshape(T, d).contiguous()
        gx = torch.empty(T, d, device=res.device, dtype=x_dtype)
        gr = torch.empty(T, d, device=res.device, dtype=r_dtype) if r_dtype is not None else None
        n_prog = triton.cdiv(T, ctx.flags["BLOCK_T"])
        gw = torch.empty(n_prog, d, device=res.device, dtype=torch.float32)
        _add_rmsnorm_bwd_kernel[(n_prog,)](
            g, gres, res, rstd, weight, gx, gr, gw, T, d,
            HAS_GRES=gres is not None, HAS_RES=gr is not None, **ctx.flags)
        shape = ctx.shape
        return gx.reshape(shape), None if gr is None else gr.reshape(shape), gw.sum(0).to(weight.dtype), None


def add_rmsnorm(x, residual, weight, eps):
    """x, residual (..., d) (residual may be None); weight (d,). Returns (normed, new_residual fp32)."""
    return AddRMSNormTriton.apply(x, residual, weight, eps)
