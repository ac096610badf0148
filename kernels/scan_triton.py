"""The selective scan as Triton kernels (forward + backward), built the way mamba_ssm's CUDA scan is.

Same signature and results as :func:`kernels.scan_ref.selective_scan_chunked` (plus ``initial_state``).
One program per (batch, block of BLOCK_D channels) walks the sequence in chunks of CHUNK steps, and inside
a chunk runs **parallel over time**: per state channel n it forms the (BLOCK_D, CHUNK) tiles of decays
a_t = exp(Δ_t A_n) and inputs Δ_t u_t B_t,n and combines them with ``tl.associative_scan`` over the pairs
(a, b) ∘ (a', b') = (a·a', a'·b + b') (Blelloch 1990; mamba_ssm's block scan, Gu & Dao 2023 §3.3.2). The only
state kept between chunks is one (BLOCK_D,) vector per channel, in the program's own L1/L2-resident slice of a
small buffer (a register tile indexed by the channel loop would cost a layout conversion per channel); the
per-step states live only in registers. Tiles are (channel, time) with the
channel axis contiguous in memory, which is how the model lays its activations out ((b, L, d) buffers seen
as (b, d, L)), so every load and store is coalesced; outputs are allocated in the inputs' layout.

Channels: only the N learned channels (plus, in ``zero_mode="reference"``, the zero channels as A = -100)
run the pair scan. The polarized channels take their closed forms (shared/DESIGN.md §2, scan_ref's module
docstring) fused beside it: ones channels a cumulative sum (``tl.cumsum`` plus the carried sum), exact
zero channels the elementwise product C_t·Δ_t B_t u_t. Δ-bias + softplus, D·u and the SiLU(z) gate are fused.

Backward: chunks last to first. The forward stored the carried state at each chunk start (one tile per
chunk, only when a gradient is needed) and the pre-gate output when z is given (mamba_ssm saves it too);
the backward recomputes the chunk's states with the same pair scan and runs the adjoint
G_t = C_t·g_t + a_{t+1}·G_{t+1} as a reverse pair scan, carrying one dL/dh per channel between chunks. No per-step
state ever reaches global memory. dB and dC (sums over all channels d) are reduced over the program's
BLOCK_D channels in registers and added with fp32 atomics into one (b, N_total, L) buffer (as mamba_ssm
does per channel; not a partial per program); dA, dD and dΔ-bias are per-batch partials (b × parameter
size, small) summed in PyTorch; the atomics make dB/dC nondeterministic in the last bits. Batch, channel-block
and chunk starts are int64 base offsets, tile offsets small int32 (b·d·L may pass 2^31).
L is a runtime argument (never specialized): one compile serves every sequence length.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.layout import like
from kernels.scan_ref import REFERENCE_ZERO_A, _prepare_dt
from kernels.triton_jit import jit

# (BLOCK_D, CHUNK, num_warps) per pass and input element size, from benchmarks/compile_kernels.py for sm_90:
# zero spills with room to spare (~150 registers: the device's Triton may allocate differently), 8 warps.
# 16 bf16 channels fill one 32-byte sector per time step; batch 8 x d_inner 1536 gives 768 programs.
# "train" is the forward that saves chunk states for a backward: it must share the backward's CHUNK.
# 16 x 64 tiles at 4 warps compile at ~255 registers and 16 x 64 backward tiles spill; `make gpu-check`
# (benchmarks/gpu_check.py) times alternatives on the device so this table can follow device figures.
CONFIGS = {
    ("fwd", 2): (16, 64, 8), ("fwd", 4): (16, 64, 8),
    ("train", 2): (16, 32, 4), ("train", 4): (16, 32, 4),
    ("bwd", 2): (16, 32, 8), ("bwd", 4): (16, 32, 8),
}
_NOT_SPECIALIZED = ("L", "n_chunks", "s_ub", "s_tb", "s_zb", "s_yb", "s_gb", "s_h0b")


@triton.jit
def _pair(a1, b1, a2, b2):
    """Compose two steps of h -> a·h + b (first (a1, b1), then (a2, b2))."""
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _softplus(x):
    """log1p(e^x) accurately (Goldberg's trick), identity above 20 as F.softplus."""
    ex = tl.exp(x)
    w1 = 1.0 + ex
    return tl.where(x > 20.0, x, tl.where(w1 == 1.0, ex, ex * tl.log(w1) / (w1 - 1.0)))


@triton.jit
def _column(tile, cols, j):
    """Column j of a 2-D tile as a vector (a masked sum: register tiles have no dynamic indexing)."""
    return tl.sum(tl.where(cols[None, :] == j, tile, 0.0), axis=1)


@jit(do_not_specialize=_NOT_SPECIALIZED)
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, y_ptr, ypre_ptr, state_ptr,
    d, L, n_chunks, n_slots,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_h0b, s_h0d, s_h0n,
    s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    N_ONES: tl.constexpr, N_SCAN: tl.constexpr, N_ZEROS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SAVE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D  # tiles: an int64 base offset plus small int32 offsets
    dd = tl.arange(0, BLOCK_D)
    offs_d = tl.program_id(1) * BLOCK_D + dd
    mask_d = offs_d < d
    tt = tl.arange(0, CHUNK)
    S = N_ONES + N_SCAN  # carried state channels: [ones, scan channels]
    # The carried state lives in this program's (S, BLOCK_D) slices of ``state`` (L1/L2-resident; a register
    # tile indexed by a loop variable would need a layout conversion per channel). Chunk c reads slot
    # c % n_slots and writes slot (c + 1) % n_slots, so reads and writes never alias within a chunk; with
    # n_slots = n_chunks + 1 every chunk start stays there for the backward.
    carry = state_ptr + pid_b * n_slots * S * d + offs_d
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for n in range(0, S):
        h = tl.zeros((BLOCK_D,), dtype=tl.float32)
        if HAS_H0:
            h = tl.load(h0_ptr + pid_b * s_h0b + offs_d * s_h0d + n * s_h0n, mask=mask_d, other=0.0).to(tl.float32)
        tl.store(carry + n * d, h, mask=mask_d)
    tl.debug_barrier()
    for c in range(0, n_chunks):
        t0 = tl.cast(c, tl.int64) * CHUNK  # int64: t0 times the time stride may pass 2^31
        mask = mask_d[:, None] & (t0 + tt < L)[None, :]
        dt = tl.load(dt_ptr + (pid_b * s_tb + d0 * s_td + t0 * s_tl) + dd[:, None] * s_td + tt[None, :] * s_tl,
                     mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(mask, dt, 0.0)  # past L: a = 1, input 0, so the state passes through unchanged
        x = tl.load(u_ptr + (pid_b * s_ub + d0 * s_ud + t0 * s_ul) + dd[:, None] * s_ud + tt[None, :] * s_ul,
                    mask=mask, other=0.0).to(tl.float32)
        w = dt * x
        h_in = carry + (c % n_slots) * S * d
        h_out = carry + ((c + 1) % n_slots) * S * d
        y = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
        if HAS_D:
            y = Dv[:, None] * x
        B_row = B_ptr + pid_b * s_Bb + (t0 + tt) * s_Bl
        C_row = C_ptr + pid_b * s_Cb + (t0 + tt) * s_Cl
        mask_t = t0 + tt < L
        for n in range(0, N_ONES):  # a = 1: h_t = h_start + Σ_{s≤t} Δ_s B_s u_s
            Bn = tl.load(B_row + n * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_row + n * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
            hs = tl.cumsum(w * Bn[None, :], axis=1) + tl.load(h_in + n * d, mask=mask_d, other=0.0)[:, None]
            y += hs * Cn[None, :]
            tl.store(h_out + n * d, _column(hs, tt, CHUNK - 1), mask=mask_d)
        for n in range(0, N_SCAN):  # learned channels (and reference-mode zeros): the pair scan
            An = tl.load(A_ptr + offs_d * s_Ad + n * s_An, mask=mask_d, other=0.0).to(tl.float32)
            Bn = tl.load(B_row + (N_ONES + n) * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_row + (N_ONES + n) * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
            decay, hs = tl.associative_scan((tl.exp(dt * An[:, None]), w * Bn[None, :]), 1, _pair)
            hs += decay * tl.load(h_in + (N_ONES + n) * d, mask=mask_d, other=0.0)[:, None]
            y += hs * Cn[None, :]
            tl.store(h_out + (N_ONES + n) * d, _column(hs, tt, CHUNK - 1), mask=mask_d)
        for n in range(0, N_ZEROS):  # exact zeros, a = 0: h_t = Δ_t B_t u_t
            Bn = tl.load(B_row + (S + n) * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_row + (S + n) * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
            y += w * (Bn * Cn)[None, :]
        out = (pid_b * s_yb + d0 * s_yd + t0 * s_yl) + dd[:, None] * s_yd + tt[None, :] * s_yl
        if HAS_Z:
            if SAVE:
                tl.store(ypre_ptr + out, y.to(ypre_ptr.dtype.element_ty), mask=mask)
            zz = tl.load(z_ptr + (pid_b * s_zb + d0 * s_zd + t0 * s_zl) + dd[:, None] * s_zd + tt[None, :] * s_zl,
                         mask=mask, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # this chunk's carried states are visible to every thread of the next


@jit(do_not_specialize=_NOT_SPECIALIZED)
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ypre_ptr, hchunk_ptr, gy_ptr, ghlast_ptr,
    gu_ptr, gdt_ptr, gz_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr, gstate_ptr,
    d, L, n_chunks,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_gb, s_gd, s_gl,
    s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    N_ONES: tl.constexpr, N_SCAN: tl.constexpr, N_ZEROS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GH: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D  # tiles: an int64 base offset plus small int32 offsets
    dd = tl.arange(0, BLOCK_D)
    offs_d = tl.program_id(1) * BLOCK_D + dd
    mask_d = offs_d < d
    tt = tl.arange(0, CHUNK)
    S = N_ONES + N_SCAN
    n_total = S + N_ZEROS
    # K = dL/dh at the step before the current chunk's end, carried in two slots of gstate as the forward's
    # state; the chunk-start states are the forward's slots 0 .. n_chunks - 1 (n_slots = n_chunks + 1)
    K_ptr = gstate_ptr + pid_b * 2 * S * d + offs_d
    gA_row = gA_ptr + pid_b * S * d + offs_d
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    for n in range(0, S):
        K = tl.zeros((BLOCK_D,), dtype=tl.float32)
        if HAS_GH:
            K = tl.load(ghlast_ptr + pid_b * S * d + n * d + offs_d, mask=mask_d, other=0.0)
        tl.store(K_ptr + n * d, K, mask=mask_d)
    tl.debug_barrier()
    gD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for ci in range(0, n_chunks):
        c = n_chunks - 1 - ci
        t0 = tl.cast(c, tl.int64) * CHUNK  # int64: t0 times the time stride may pass 2^31
        mask_t = t0 + tt < L
        mask = mask_d[:, None] & mask_t[None, :]
        dt_tile = dt_ptr + (pid_b * s_tb + d0 * s_td + t0 * s_tl) + dd[:, None] * s_td + tt[None, :] * s_tl
        dt_raw = tl.load(dt_tile, mask=mask, other=0.0).to(tl.float32)
        # Δ one step ahead, for a_{t+1} of the adjoint; the chunk's last column takes a = 1 because the
        # carried K already includes a_{t+1}
        nxt = mask_d[:, None] & ((tt < CHUNK - 1) & (t0 + tt + 1 < L))[None, :]
        dt_next = tl.load(dt_tile + s_tl, mask=nxt, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt_raw += bias[:, None]
            dt_next += bias[:, None]
        dt = dt_raw
        if SOFTPLUS:
            dt = _softplus(dt_raw)
            dt_next = _softplus(dt_next)
        dt = tl.where(mask, dt, 0.0)
        dt_next = tl.where(nxt, dt_next, 0.0)
        x = tl.load(u_ptr + (pid_b * s_ub + d0 * s_ud + t0 * s_ul) + dd[:, None] * s_ud + tt[None, :] * s_ul,
                    mask=mask, other=0.0).to(tl.float32)
        w = dt * x
        io = (pid_b * s_gb + d0 * s_gd + t0 * s_gl) + dd[:, None] * s_gd + tt[None, :] * s_gl  # gradient tiles
        g = tl.load(gy_ptr + (pid_b * s_yb + d0 * s_yd + t0 * s_yl) + dd[:, None] * s_yd + tt[None, :] * s_yl,
                    mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_ptr + (pid_b * s_zb + d0 * s_zd + t0 * s_zl) + dd[:, None] * s_zd + tt[None, :] * s_zl,
                         mask=mask, other=0.0).to(tl.float32)
            yp = tl.load(ypre_ptr + io, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zz)
            tl.store(gz_ptr + io, (g * yp * sig * (1.0 + zz * (1.0 - sig))).to(gz_ptr.dtype.element_ty), mask=mask)
            g = g * zz * sig
        gD_acc += tl.sum(g * x, axis=1)
        saved = hchunk_ptr + (pid_b * (n_chunks + 1) + c) * S * d + offs_d
        K_in = K_ptr + (ci % 2) * S * d
        K_out = K_ptr + ((ci + 1) % 2) * S * d
        gw = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # dL/d(Δ_t u_t)
        gdt_decay = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # Σ_n A_n · dL/d(Δ_t A_n)
        B_row = B_ptr + pid_b * s_Bb + (t0 + tt) * s_Bl
        C_row = C_ptr + pid_b * s_Cb + (t0 + tt) * s_Cl
        red = (pid_b * n_total) * L + t0 + tt  # row 0 of this batch's dB / dC buffers at this chunk
        for n in range(0, N_ONES):  # a = 1: forward a cumulative sum, adjoint a reverse one
            Bn = tl.load(B_row + n * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_row + n * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
            hs = tl.cumsum(w * Bn[None, :], axis=1) + tl.load(saved + n * d, mask=mask_d, other=0.0)[:, None]
            G = tl.cumsum(g * Cn[None, :], axis=1, reverse=True) \
                + tl.load(K_in + n * d, mask=mask_d, other=0.0)[:, None]
            tl.atomic_add(gC_ptr + red + n * L, tl.sum(g * hs, axis=0), mask=mask_t, sem="relaxed")
            tl.atomic_add(gB_ptr + red + n * L, tl.sum(G * w, axis=0), mask=mask_t, sem="relaxed")
            gw += G * Bn[None, :]
            tl.store(K_out + n * d, _column(G, tt, 0), mask=mask_d)
        for n in range(0, N_SCAN):
            j = N_ONES + n
            An = tl.load(A_ptr + offs_d * s_Ad + n * s_An, mask=mask_d, other=0.0).to(tl.float32)
            Bn = tl.load(B_row + j * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_row + j * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
            a = tl.exp(dt * An[:, None])
            wB = w * Bn[None, :]
            decay, hs = tl.associative_scan((a, wB), 1, _pair)  # the chunk's states, recomputed
            hs += decay * tl.load(saved + j * d, mask=mask_d, other=0.0)[:, None]
            # G_t = g_t C_t + a_{t+1} G_{t+1}, the chunk's last step taking the carried K
            decay, G = tl.associative_scan((tl.exp(dt_next * An[:, None]), g * Cn[None, :]), 1, _pair, reverse=True)
            G += decay * tl.load(K_in + j * d, mask=mask_d, other=0.0)[:, None]
            tl.atomic_add(gC_ptr + red + j * L, tl.sum(g * hs, axis=0), mask=mask_t, sem="relaxed")
            tl.atomic_add(gB_ptr + red + j * L, tl.sum(G * w, axis=0), mask=mask_t, sem="relaxed")
            gw += G * Bn[None, :]
            m = G * (hs - wB)  # G_t · a_t h_{t-1} = dL/d(Δ_t A_n) / ... without a shifted state
            gdt_decay += m * An[:, None]
            tl.atomic_add(gA_row + j * d, tl.sum(m * dt, axis=1), mask=mask_d, sem="relaxed")  # rows of its own
            tl.store(K_out + j * d, _column(a * G, tt, 0), mask=mask_d)
        for n in range(0, N_ZEROS):  # y_t += C_t Δ_t B_t u_t
            Bn = tl.load(B_row + (S + n) * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_row + (S + n) * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
            gwz = tl.sum(g * w, axis=0)
            tl.atomic_add(gC_ptr + red + (S + n) * L, gwz * Bn, mask=mask_t, sem="relaxed")
            tl.atomic_add(gB_ptr + red + (S + n) * L, gwz * Cn, mask=mask_t, sem="relaxed")
            gw += g * (Bn * Cn)[None, :]
        gdt = gw * x + gdt_decay
        if SOFTPLUS:
            gdt = gdt * tl.sigmoid(dt_raw)
        gbias_acc += tl.sum(tl.where(mask, gdt, 0.0), axis=1)
        tl.store(gu_ptr + io, (gw * dt + g * Dv[:, None]).to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gdt_ptr + io, gdt.to(gdt_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()
    tl.store(gD_ptr + pid_b * d + offs_d, gD_acc, mask=mask_d)
    tl.store(gbias_ptr + pid_b * d + offs_d, gbias_acc, mask=mask_d)


def config(kind: str, dtype: torch.dtype, d: int, block_d: int | None) -> tuple[int, int, int]:
    """(BLOCK_D, CHUNK, num_warps) for a pass from :data:`CONFIGS`; ``block_d`` overrides (tests shrink it)."""
    bd, chunk, warps = CONFIGS[(kind, min(torch.finfo(dtype).bits // 8, 4))]
    return block_d or min(bd, max(triton.next_power_of_2(d), 2)), chunk, warps


def _strides3(t):
    return list(t.stride()) if t is not None else [0, 0, 0]


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper: returns (y in u's dtype, last state (b, d, n_ones + N_scan) fp32)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus, n_ones, n_zeros, chunk, block_d, save):
        b, d, L = u.shape
        n_scan = A.shape[1]
        S = n_ones + n_scan
        fwd_block_d, fwd_chunk, warps = config("train" if save else "fwd", u.dtype, d, block_d)
        assert not save or fwd_chunk == config("bwd", u.dtype, d, None)[1], "CONFIGS: train and bwd CHUNK differ"
        chunk = chunk or fwd_chunk
        n_chunks = triton.cdiv(L, chunk)
        y = like(u)
        ypre = like(u) if save and z is not None else None
        n_slots = n_chunks + 1 if save else 2
        state = torch.empty(b, n_slots, S, d, device=u.device, dtype=torch.float32)
        flags = dict(N_ONES=n_ones, N_SCAN=n_scan, N_ZEROS=n_zeros, SOFTPLUS=bool(softplus), HAS_D=D is not None,
                     HAS_Z=z is not None, HAS_BIAS=delta_bias is not None)
        _scan_fwd_kernel[(b, triton.cdiv(d, fwd_block_d))](
            u, delta, A, B, C, D, z, delta_bias, h0, y, ypre, state, d, L, n_chunks, n_slots,
            *u.stride(), *delta.stride(), *_strides3(z), *y.stride(), *_strides3(h0), *A.stride(),
            *B.stride(), *C.stride(), HAS_H0=h0 is not None, SAVE=save, CHUNK=chunk, BLOCK_D=fwd_block_d,
            num_warps=warps, **flags)
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ypre, state)
            ctx.flags, ctx.chunk, ctx.block_d = flags, chunk, block_d
        ctx.set_materialize_grads(False)
        return y, state[:, n_chunks % n_slots].transpose(1, 2)

    @staticmethod
    def backward(ctx, gy, ghlast):
        u, delta, A, B, C, D, z, delta_bias, ypre, hchunk = ctx.saved_tensors
        flags = ctx.flags
        b, d, L = u.shape
        S, n_total = flags["N_ONES"] + flags["N_SCAN"], B.shape[1]
        block_d, _, warps = config("bwd", u.dtype, d, ctx.block_d)
        chunk = ctx.chunk
        n_chunks = hchunk.shape[1] - 1
        dev, f32 = u.device, torch.float32
        gy = torch.zeros_like(u) if gy is None else gy
        ghlast = None if ghlast is None else ghlast.float().transpose(1, 2).contiguous()
        gu, gdelta = like(u), like(u, delta.dtype)
        gz = like(u, z.dtype) if z is not None else None
        if ypre is None:
            ypre = gu  # placeholder pointer (unused without z); shares the gradient layout
        gA = torch.zeros(b, S, d, device=dev, dtype=f32)
        gstate = torch.empty(b, 2, S, d, device=dev, dtype=f32)
        gB, gC = (torch.zeros(b, n_total, L, device=dev, dtype=f32) for _ in range(2))
        gD, gbias = (torch.empty(b, d, device=dev, dtype=f32) for _ in range(2))
        assert gu.stride() == ypre.stride() == gdelta.stride()
        _scan_bwd_kernel[(b, triton.cdiv(d, block_d))](
            u, delta, A, B, C, D, z, delta_bias, ypre, hchunk, gy, ghlast,
            gu, gdelta, gz, gA, gB, gC, gD, gbias, gstate, d, L, n_chunks,
            *u.stride(), *delta.stride(), *_strides3(z), *gy.stride(), *gu.stride(), *A.stride(),
            *B.stride(), *C.stride(), HAS_GH=ghlast is not None, CHUNK=chunk, BLOCK_D=block_d,
            num_warps=warps, **flags)
        need = ctx.needs_input_grad
        grad = lambda i, g, like_: g.to(like_.dtype) if need[i] else None
        n1 = flags["N_ONES"]
        return (gu, gdelta, grad(2, gA.sum(0)[n1:S].t(), A), grad(3, gB, B), grad(4, gC, C),
                grad(5, gD.sum(0), D), gz, grad(7, gbias.sum(0), delta_bias),
                gstate[:, n_chunks % 2].transpose(1, 2) if need[8] else None, None, None, None, None, None, None)


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact", return_last_state=False, initial_state=None,
    chunk_size=None, block_d=None,
):
    """Triton selective scan; arguments as :func:`kernels.scan_ref.selective_scan_chunked`, plus
    ``initial_state`` (b, d, N_total) to continue from (fp32)."""
    assert zero_mode in ("exact", "reference")
    d, N = A.shape
    A_scan = A.float()
    if zero_mode == "reference" and n_zeros:  # the paper's zeros: ordinary channels with A = -100
        A_scan = torch.cat([A_scan, A_scan.new_full((d, n_zeros), REFERENCE_ZERO_A)], dim=1)
    exact_zeros = n_zeros if zero_mode == "exact" else 0
    S = n_ones + A_scan.shape[1]
    h0 = None if initial_state is None else initial_state[..., :S]
    # states are saved only when a backward can follow (grad mode on and some input needs a gradient)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                           for t in (u, delta, A_scan, B, C, D, z, delta_bias, h0))
    y, h = SelectiveScanTriton.apply(u, delta, A_scan, B, C, D, z, delta_bias, h0, delta_softplus, n_ones,
                                     exact_zeros, chunk_size, block_d, save)
    if not return_last_state:
        return y
    if exact_zeros:  # a = 0: the last state is the last step's input Δ_L B_L u_L (a zero initial state decays)
        w_last = _prepare_dt(delta[..., -1], delta_bias, delta_softplus) * u[..., -1].float()
        h = torch.cat([h, w_last[..., None] * B[:, None, S:, -1].float()], dim=-1)
    return y, h
