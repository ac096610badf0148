"""The selective scan as Triton kernels (forward + backward), polarized channels, D, gating and Δ fused.

Same signature and results as :func:`kernels.scan_ref.selective_scan_chunked`. One program per
(batch, block of BLOCK_D channels) walks the sequence with its (BLOCK_D, N_total) fp32 state in
registers (the mamba.py / mamba_ssm design, Gu & Dao 2023 Algorithm 2). Per column n of the state the
transition is a_t = exp(Δ_t·Ã_n) · keep_n with

    ones channels:       Ã = 0,   keep = 1   -> a_t = 1 exactly (the cumulative sum)
    learned channels:    Ã = A,   keep = 1
    zeros, exact:        Ã = 0,   keep = 0   -> a_t = 0 exactly (h_t = Δ_t B_t u_t)
    zeros, reference:    Ã = -100, keep = 1  (the paper's code)

so the fixed channels never evaluate exp(-inf) and da/dΔ = Ã·a is 0 for them, not NaN.

Memory: the forward pass keeps only the state at each chunk start (L / chunk of them). The backward pass
walks chunks last to first: it recomputes the chunk's states from its start into a per-program scratch
buffer of chunk+1 states, then runs the adjoint recurrence G_t = C_t·gy_t + a_{t+1}·G_{t+1} backwards
(the same maths as :class:`kernels.scan_ref._ChunkedScan`). Reductions over channels (dB, dC) and over
batch (dA, dD, dΔ-bias) are written as per-program partials and summed in PyTorch: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.scan_ref import REFERENCE_ZERO_A
from kernels.triton_jit import jit


@jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr, h0s_ptr, hlast_ptr,
    d, L, n_learned, n_chunks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    N_ONES: tl.constexpr, N_ZEROS: tl.constexpr, REF_ZEROS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    n_total = N_ONES + n_learned + N_ZEROS
    mask_n = offs_n < n_total
    learned = (offs_n >= N_ONES) & (offs_n < N_ONES + n_learned)
    zeros = (offs_n >= N_ONES + n_learned) & mask_n
    A = tl.load(A_ptr + offs_d[:, None] * s_Ad + (offs_n[None, :] - N_ONES) * s_An,
                mask=mask_d[:, None] & learned[None, :], other=0.0).to(tl.float32)
    if REF_ZEROS:
        A = tl.where(zeros[None, :], -100.0, A)
        keep = tl.full((BLOCK_N,), 1.0, tl.float32)
    else:
        keep = tl.where(zeros, 0.0, 1.0)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tile = offs_d[:, None] * BLOCK_N + offs_n[None, :]  # (d, n) offsets into h0s / hlast rows
    tile_mask = mask_d[:, None] & mask_n[None, :]
    h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for t in range(0, L):
        if t % CHUNK == 0:
            tl.store(h0s_ptr + ((pid_b * n_chunks + t // CHUNK) * d) * BLOCK_N + tile, h, mask=tile_mask)
        dt = tl.load(delta_ptr + pid_b * s_db + offs_d * s_dd + t * s_dl, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias
        if SOFTPLUS:  # log1p(e^x) accurately (Goldberg's trick), identity above 20 as F.softplus
            ex = tl.exp(dt)
            w1 = 1.0 + ex
            dt = tl.where(dt > 20.0, dt, tl.where(w1 == 1.0, ex, ex * tl.log(w1) / (w1 - 1.0)))
        x = tl.load(u_ptr + pid_b * s_ub + offs_d * s_ud + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
        Bt = tl.load(B_ptr + pid_b * s_Bb + offs_n * s_Bn + t * s_Bl, mask=mask_n, other=0.0).to(tl.float32)
        Ct = tl.load(C_ptr + pid_b * s_Cb + offs_n * s_Cn + t * s_Cl, mask=mask_n, other=0.0).to(tl.float32)
        a = tl.exp(dt[:, None] * A) * keep[None, :]
        h = a * h + (dt * x)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        if HAS_D:
            y += Dv * x
        if HAS_Z:
            zz = tl.load(z_ptr + pid_b * s_zb + offs_d * s_zd + t * s_zl, mask=mask_d, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(y_ptr + (pid_b * d + offs_d) * L + t, y.to(y_ptr.dtype.element_ty), mask=mask_d)
    tl.store(hlast_ptr + pid_b * d * BLOCK_N + tile, h, mask=tile_mask)


@jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, gy_ptr, ghlast_ptr, h0s_ptr, scratch_ptr,
    gu_ptr, gdelta_ptr, gz_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr,
    batch, d, L, n_learned, n_chunks,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    N_ONES: tl.constexpr, N_ZEROS: tl.constexpr, REF_ZEROS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GH: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < d
    n_total = N_ONES + n_learned + N_ZEROS
    mask_n = offs_n < n_total
    learned = (offs_n >= N_ONES) & (offs_n < N_ONES + n_learned)
    zeros = (offs_n >= N_ONES + n_learned) & mask_n
    A = tl.load(A_ptr + offs_d[:, None] * s_Ad + (offs_n[None, :] - N_ONES) * s_An,
                mask=mask_d[:, None] & learned[None, :], other=0.0).to(tl.float32)
    if REF_ZEROS:
        A = tl.where(zeros[None, :], -100.0, A)
        keep = tl.full((BLOCK_N,), 1.0, tl.float32)
    else:
        keep = tl.where(zeros, 0.0, 1.0)
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    tile = offs_d[:, None] * BLOCK_N + offs_n[None, :]
    tile_mask = mask_d[:, None] & mask_n[None, :]
    # this program's scratch: CHUNK + 1 states, slot i = state after step (chunk start + i - 1)
    scratch = scratch_ptr + (pid_b * tl.num_programs(1) + pid_d) * (CHUNK + 1) * BLOCK_D * BLOCK_N \
        + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
    G = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)  # a_{t+1} G_{t+1}, carried backwards
    if HAS_GH:
        G = tl.load(ghlast_ptr + pid_b * d * BLOCK_N + tile, mask=tile_mask, other=0.0)
    gA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    gD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        start = c * CHUNK
        h = tl.load(h0s_ptr + ((pid_b * n_chunks + c) * d) * BLOCK_N + tile, mask=tile_mask, other=0.0)
        tl.store(scratch, h)
        for i in range(0, CHUNK):  # recompute the chunk's states from its start
            t = start + i
            if t < L:
                dt = tl.load(delta_ptr + pid_b * s_db + offs_d * s_dd + t * s_dl, mask=mask_d, other=0.0)
                dt = dt.to(tl.float32)
                if HAS_BIAS:
                    dt += bias
                if SOFTPLUS:
                    ex = tl.exp(dt)
                    w1 = 1.0 + ex
                    dt = tl.where(dt > 20.0, dt, tl.where(w1 == 1.0, ex, ex * tl.log(w1) / (w1 - 1.0)))
                x = tl.load(u_ptr + pid_b * s_ub + offs_d * s_ud + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
                Bt = tl.load(B_ptr + pid_b * s_Bb + offs_n * s_Bn + t * s_Bl, mask=mask_n, other=0.0).to(tl.float32)
                h = tl.exp(dt[:, None] * A) * keep[None, :] * h + (dt * x)[:, None] * Bt[None, :]
                tl.store(scratch + (i + 1) * BLOCK_D * BLOCK_N, h)
        tl.debug_barrier()
        for i in range(0, CHUNK):  # adjoint recurrence, last step of the chunk first
            j = CHUNK - 1 - i
            t = start + j
            if t < L:
                dt_raw = tl.load(delta_ptr + pid_b * s_db + offs_d * s_dd + t * s_dl, mask=mask_d, other=0.0)
                dt_raw = dt_raw.to(tl.float32)
                if HAS_BIAS:
                    dt_raw += bias
                dt = dt_raw
                if SOFTPLUS:
                    ex = tl.exp(dt_raw)
                    w1 = 1.0 + ex
                    dt = tl.where(dt_raw > 20.0, dt_raw, tl.where(w1 == 1.0, ex, ex * tl.log(w1) / (w1 - 1.0)))
                x = tl.load(u_ptr + pid_b * s_ub + offs_d * s_ud + t * s_ul, mask=mask_d, other=0.0).to(tl.float32)
                Bt = tl.load(B_ptr + pid_b * s_Bb + offs_n * s_Bn + t * s_Bl, mask=mask_n, other=0.0).to(tl.float32)
                Ct = tl.load(C_ptr + pid_b * s_Cb + offs_n * s_Cn + t * s_Cl, mask=mask_n, other=0.0).to(tl.float32)
                a = tl.exp(dt[:, None] * A) * keep[None, :]
                h_t = tl.load(scratch + (j + 1) * BLOCK_D * BLOCK_N)
                h_prev = tl.load(scratch + j * BLOCK_D * BLOCK_N)
                g = tl.load(gy_ptr + (pid_b * d + offs_d) * L + t, mask=mask_d, other=0.0).to(tl.float32)
                if HAS_Z:
                    zz = tl.load(z_ptr + pid_b * s_zb + offs_d * s_zd + t * s_zl, mask=mask_d, other=0.0)
                    zz = zz.to(tl.float32)
                    sig = tl.sigmoid(zz)
                    y_pre = tl.sum(h_t * Ct[None, :], axis=1) + Dv * x
                    gz = g * y_pre * sig * (1.0 + zz * (1.0 - sig))
                    tl.store(gz_ptr + (pid_b * d + offs_d) * L + t, gz.to(gz_ptr.dtype.element_ty), mask=mask_d)
                    g = g * zz * sig
                gD_acc += g * x
                G += g[:, None] * Ct[None, :]
                gC_t = tl.sum(h_t * g[:, None], axis=0)
                gB_t = tl.sum(G * (dt * x)[:, None], axis=0)
                part = ((pid_d * batch + pid_b) * n_total + offs_n) * L + t
                tl.store(gC_ptr + part, gC_t, mask=mask_n)
                tl.store(gB_ptr + part, gB_t, mask=mask_n)
                gw = tl.sum(G * Bt[None, :], axis=1)  # d/d(Δ_t u_t)
                g_dtA = G * h_prev * a  # d/d(Δ_t Ã) of a_t h_{t-1}
                gdt = gw * x + tl.sum(g_dtA * A, axis=1)
                gA_acc += g_dtA * dt[:, None]
                gx = g * Dv + gw * dt
                tl.store(gu_ptr + (pid_b * d + offs_d) * L + t, gx.to(gu_ptr.dtype.element_ty), mask=mask_d)
                if SOFTPLUS:
                    gdt = gdt * tl.sigmoid(dt_raw)
                gbias_acc += gdt
                tl.store(gdelta_ptr + (pid_b * d + offs_d) * L + t, gdt.to(gdelta_ptr.dtype.element_ty),
                         mask=mask_d)
                G = G * a
        tl.debug_barrier()  # the next chunk overwrites the scratch
    tl.store(gA_ptr + pid_b * d * BLOCK_N + tile, gA_acc, mask=tile_mask)
    tl.store(gD_ptr + pid_b * d + offs_d, gD_acc, mask=mask_d)
    tl.store(gbias_ptr + pid_b * d + offs_d, gbias_acc, mask=mask_d)


def _strides(*tensors):
    out = []
    for t in tensors:
        out += list(t.stride()) if t is not None else [0] * 3
    return out


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper: returns (y in u's dtype, last state (b, d, N_total) fp32)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, n_ones, n_zeros, zero_mode,
                chunk_size, block_d):
        b, d, L = u.shape
        N = A.shape[1]
        n_total = n_ones + N + n_zeros
        block_n = max(triton.next_power_of_2(n_total), 2)
        n_chunks = triton.cdiv(L, chunk_size)
        y = torch.empty(b, d, L, device=u.device, dtype=u.dtype)
        h0s = torch.empty(b, n_chunks, d, block_n, device=u.device, dtype=torch.float32)
        hlast = torch.empty(b, d, block_n, device=u.device, dtype=torch.float32)
        flags = dict(N_ONES=n_ones, N_ZEROS=n_zeros, REF_ZEROS=zero_mode == "reference", SOFTPLUS=bool(delta_softplus),
                     HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                     CHUNK=chunk_size, BLOCK_D=block_d, BLOCK_N=block_n)
        A_strides = list(A.stride()) if N else [0, 0]
        strides = _strides(u, delta, z)[:9] + A_strides + _strides(B, C)
        _scan_fwd_kernel[(b, triton.cdiv(d, block_d))](
            u, delta, A, B, C, D, z, delta_bias, y, h0s, hlast, d, L, N, n_chunks, *strides, **flags)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, h0s)
        ctx.flags, ctx.strides, ctx.n_total = flags, strides, n_total
        ctx.set_materialize_grads(False)
        return y, hlast[..., :n_total]

    @staticmethod
    def backward(ctx, gy, ghlast):
        u, delta, A, B, C, D, z, delta_bias, h0s = ctx.saved_tensors
        flags, n_total = ctx.flags, ctx.n_total
        b, d, L = u.shape
        N = A.shape[1]
        block_d, block_n, chunk = flags["BLOCK_D"], flags["BLOCK_N"], flags["CHUNK"]
        n_dblocks = triton.cdiv(d, block_d)
        dev, f32 = u.device, torch.float32
        gy = torch.zeros_like(u) if gy is None else gy.contiguous()
        if ghlast is not None:
            ghlast = torch.nn.functional.pad(ghlast.float(), (0, block_n - n_total)).contiguous()
        scratch = torch.empty(b * n_dblocks, chunk + 1, block_d, block_n, device=dev, dtype=f32)
        gu = torch.empty(b, d, L, device=dev, dtype=u.dtype)
        gdelta = torch.empty(b, d, L, device=dev, dtype=delta.dtype)
        gz = torch.empty(b, d, L, device=dev, dtype=z.dtype) if z is not None else None
        gA = torch.empty(b, d, block_n, device=dev, dtype=f32)
        gB = torch.empty(n_dblocks, b, n_total, L, device=dev, dtype=f32)
        gC = torch.empty_like(gB)
        gD = torch.empty(b, d, device=dev, dtype=f32)
        gbias = torch.empty_like(gD)
        _scan_bwd_kernel[(b, n_dblocks)](
            u, delta, A, B, C, D, z, delta_bias, gy, ghlast, h0s, scratch,
            gu, gdelta, gz, gA, gB, gC, gD, gbias, b, d, L, N, h0s.shape[1], *ctx.strides,
            HAS_GH=ghlast is not None, **flags)
        n1 = flags["N_ONES"]
        cast = lambda g, like: None if like is None else g.to(like.dtype)
        return (gu, gdelta, cast(gA.sum(0)[:, n1 : n1 + N], A), cast(gB.sum(0), B), cast(gC.sum(0), C),
                cast(gD.sum(0), D), gz, cast(gbias.sum(0), delta_bias), None, None, None, None, None, None)


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact", return_last_state=False, chunk_size=64, block_d=None,
):
    """Triton selective scan; arguments as :func:`kernels.scan_ref.selective_scan_chunked`."""
    assert zero_mode in ("exact", "reference") and REFERENCE_ZERO_A == -100.0  # the kernels hard-code -100
    d = u.shape[1]
    block_d = block_d or min(32, max(triton.next_power_of_2(d), 2))
    A = A.float()
    y, h = SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus, n_ones, n_zeros,
                                     zero_mode, chunk_size, block_d)
    return (y, h) if return_last_state else y
