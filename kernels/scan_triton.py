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

Training bytes: the forward keeps no pre-gate output and only the fp32 state every SAVE_STEPS (256) steps, one
(b, S, d) tile per segment. The backward walks chunks last to first; entering a segment (at its last chunk) it
rebuilds the segment's chunk-start states from the saved one in a forward sweep that needs no scan (each chunk's
end state is a decayed sum, h_end = exp(A ΣΔ)·h_start + Σ_t exp(A Σ_{s>t} Δ_s) Δ_t B_t u_t) into a small
L2-resident buffer; per chunk it recomputes the states with the same pair scan, rebuilds the pre-gate output
from them for dz, and runs the adjoint G_t = C_t·g_t + a_{t+1}·G_{t+1} as a reverse pair scan, carrying one dL/dh
per channel between chunks. No per-step state ever reaches global memory. dB and dC (sums over all channels d)
are reduced over the program's BLOCK_D channels in registers and added with fp32 atomics into one
(b, N_total, L) buffer (as mamba_ssm does per channel; not a partial per program); dA, dD and dΔ-bias are
per-batch partials (b × parameter size, small) summed in PyTorch; the atomics make dB/dC nondeterministic in the
last bits. Batch, channel-block and chunk starts are int64 base offsets, tile offsets small int32 (b·d·L may
pass 2^31). L is a runtime argument (never specialized): one compile serves every sequence length whose L·d
keeps its divisibility by 16; the batch strides are specialized so that Triton vectorizes the loads.

Batch 1: when batch × channel blocks cannot fill two waves of SMs, both passes split L into pieces of whole
segments, one program each. A state-passing pass writes each segment's contribution from a zero start (forward:
its end state, ``_scan_seg_kernel``; backward: the adjoint it hands back, ``_scan_adj_kernel``) and its ΣΔ; each
program folds the segments before (forward) or after (backward) its piece into its start, then walks its piece.

Packed documents (``seq_idx`` (b, L), the document of every position, non-decreasing; mamba_ssm's convention):
position t ≥ 1 starts a document when seq_idx[t] != seq_idx[t-1], and there a_t = 0 in every carried channel
(h_t = Δ_t B_t u_t). Each pass reads the chunk's seq_idx and the previous position's (no extra pass over the data),
under a constexpr HAS_SEQ_IDX (without seq_idx the kernels compile as before). The pair scans take a = 0 at
starts; the ones channels, whose plain cumulative sums cannot reset, run the pair scan with a ∈ {0, 1} instead
(forward sum and reverse adjoint sum); the adjoint takes a_{t+1} = 0 before a start. The closed-form sums
drop what a start cuts off: a chunk's end state (backward rebuild, ``_scan_seg_kernel``) keeps only the steps from
its last start on and its start state only if it has none; a segment's adjoint (``_scan_adj_kernel``) keeps only
the steps before its first start; a segment holding a start passes nothing across it in the pieces' folds (a
(b, segments) ``keep`` flag beside its ΣΔ). Exact zero channels have no memory and need nothing; an initial
state reaches only the first document.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kernels.layout import like
from kernels.scan_ref import REFERENCE_ZERO_A, _prepare_dt
from kernels.triton_jit import jit

# (BLOCK_D, CHUNK, num_warps) per pass and input element size, from benchmarks/compile_kernels.py for sm_90:
# zero spills under Triton 3.9 and the device's 3.6. 16 bf16 channels fill one 32-byte sector per time step;
# batch 8 x d_inner 1536 gives 768 programs. "train" is the forward that saves states for a backward: it must
# share the backward's CHUNK. The forwards run at most FWD_MAXNREG registers: left to itself, 3.6's ptxas (CUDA
# 12.8) picks 96-128 and spills a few bytes; 128 keeps four 4-warp programs per SM. 16 x 64 tiles at 8 warps
# spill under 3.6 at that cap; `make gpu-check` (benchmarks/gpu_check.py) times alternatives on the device.
CONFIGS = {
    ("fwd", 2): (16, 32, 4), ("fwd", 4): (16, 32, 4),
    ("train", 2): (16, 32, 4), ("train", 4): (16, 32, 4),
    ("bwd", 2): (16, 32, 8), ("bwd", 4): (16, 32, 8),
}
# The 3-D tile forward (TILE3D; ``tile="3d"`` or POLAR_SCAN_TILE=3d, not the default), from the same offline
# compile: "fwd3d" 16 channels x 16 states x 8 steps at 4 warps, each thread the 8 steps of two (channel, state)
# pairs, capped at 168 registers (MAXNREG): at 128, 3.6 spills 24-32 bytes with seq_idx (polarized); uncapped, 3.9's
# ptxas picks 96 and spills 8. "train3d" must share the backward's CHUNK (32): no 32-step tile fits 128 registers
# (88-320 bytes of spills), so it runs uncapped: 16 x 16 x 32 at 8 warps, the one 32-step tile found without spills
# under both (8 x 32 at 4 warps spills with seq_idx under 3.9); one program per SM at its 145-255 registers.
CONFIGS.update({
    ("fwd3d", 2): (16, 8, 4), ("fwd3d", 4): (16, 8, 4),
    ("train3d", 2): (16, 32, 8), ("train3d", 4): (16, 32, 8),
})
TILES = ("2d", "3d")
FWD_MAXNREG = 128
MAXNREG = {"fwd3d": 168, "train3d": None}  # per forward kind when not FWD_MAXNREG (None: ptxas picks)
SAVE_STEPS = 256  # the training forward keeps the fp32 state every 256 steps (the backward recomputes the rest)
# L and the chunk count vary per call and are never specialized. The batch strides are: a stride Triton knows to
# be a multiple of 16 keeps every tile's base 16-byte aligned, which is what lets it vectorize the channel-contiguous
# loads (ld.global.v*); a new L recompiles only when L·d changes its divisibility by 16.
_NOT_SPECIALIZED = ("L", "n_chunks", "s_qb")  # s_qb: seq_idx's batch stride, L when contiguous


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


@triton.jit
def _load_dt(dt_tile, bias, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """Δ after bias and softplus in fp32, 0 outside ``mask`` (past L: a = 1, input 0, the state passes through);
    ``bias`` broadcasts against the tile ((BLOCK_D, 1) for a (channel, time) tile, (1, BLOCK_D) for (time, channel))."""
    dt = tl.load(dt_tile, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += bias
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.where(mask, dt, 0.0)


@triton.jit
def _decays(A_ptr, s_Ad, s_An, offs_d, mask_d, nn, N_ONES: tl.constexpr, S: tl.constexpr):
    """The (S_PAD, BLOCK_D) tile of A for the carried channels: 0 for ones channels (a = exp(0·Δ) = 1) and padding."""
    rows = (nn >= N_ONES) & (nn < S)
    return tl.load(A_ptr + offs_d[None, :] * s_Ad + (nn[:, None] - N_ONES) * s_An,
                   mask=rows[:, None] & mask_d[None, :], other=0.0).to(tl.float32)


@triton.jit
def _resets(q_row, s_ql, t0, tt, mask_t):
    """True where position t0 + tt starts a document (its seq_idx differs from the previous position's); position 0
    never does. ``q_row`` is the batch's row of seq_idx."""
    pos = t0 + tt
    cur = tl.load(q_row + pos * s_ql, mask=mask_t, other=0)
    prev = tl.load(q_row + (pos - 1) * s_ql, mask=mask_t & (pos >= 1), other=0)
    return mask_t & (pos >= 1) & (cur != prev)


@triton.jit
def _last_reset(q_row, s_ql, t0, tt, mask_t):
    """The chunk's last document start (-1 if none): the steps before it do not reach the chunk's end state."""
    return tl.max(tl.where(_resets(q_row, s_ql, t0, tt, mask_t), tt, -1), axis=0)


@jit(do_not_specialize=_NOT_SPECIALIZED)
def _scan_seg_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, q_ptr, H_ptr, sdt_ptr, keep_ptr,
    d, L, n_chunks,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_qb, s_ql,
    N_ONES: tl.constexpr, N_SCAN: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SEQ_IDX: tl.constexpr, SEG_CHUNKS: tl.constexpr, S_PAD: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The state-passing pass of an L-split forward: per (batch, channel block, segment of SEG_CHUNKS chunks), the
    segment's end state from a zero start, H, and its Σ Δ (its decay is exp(A ΣΔ)). The forward's programs for
    later segments fold these into their start states. Each chunk adds exp(A Σ_{s>t} Δ_s) Δ_t B_t u_t summed over
    t (the scan-free sweep of the backward); the carried channels are one (S_PAD, BLOCK_D) register tile. With
    seq_idx, steps before a chunk's last document start and the state entering that chunk drop out, and ``keep``
    (b, segments) is 0 for a segment holding a document start (the forward then drops the earlier state)."""
    pid_b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D
    seg = tl.program_id(2)
    dd = tl.arange(0, BLOCK_D)
    offs_d = tl.program_id(1) * BLOCK_D + dd
    mask_d = offs_d < d
    tt = tl.arange(0, CHUNK)
    nn = tl.arange(0, S_PAD)
    S = N_ONES + N_SCAN
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    A2 = _decays(A_ptr, s_Ad, s_An, offs_d, mask_d, nn, N_ONES, S)
    H = tl.zeros((S_PAD, BLOCK_D), dtype=tl.float32)
    sdt = tl.zeros((BLOCK_D,), dtype=tl.float32)
    keep_seg = tl.full((), 1.0, tl.float32)
    if HAS_SEQ_IDX:
        q_row = q_ptr + pid_b * s_qb  # this batch's document index per position
    c_lo = seg * SEG_CHUNKS
    for c in range(c_lo, tl.minimum(c_lo + SEG_CHUNKS, n_chunks)):
        t0 = tl.cast(c, tl.int64) * CHUNK
        mask_t = t0 + tt < L
        mask = mask_d[:, None] & mask_t[None, :]
        dt = _load_dt(dt_ptr + (pid_b * s_tb + d0 * s_td + t0 * s_tl) + dd[:, None] * s_td + tt[None, :] * s_tl,
                      bias[:, None], mask, HAS_BIAS, SOFTPLUS)
        w = dt * tl.load(u_ptr + (pid_b * s_ub + d0 * s_ud + t0 * s_ul) + dd[:, None] * s_ud + tt[None, :] * s_ul,
                         mask=mask, other=0.0).to(tl.float32)
        if HAS_SEQ_IDX:  # only the steps from the chunk's last document start on reach its end
            p = _last_reset(q_row, s_ql, t0, tt, mask_t)
            w = tl.where((tt >= p)[None, :], w, 0.0)
            keep_c = tl.where(p < 0, 1.0, 0.0)
            keep_seg = keep_seg * keep_c
        total = tl.sum(dt, axis=1)
        after = total[:, None] - tl.cumsum(dt, axis=1)  # Σ_{s>t} Δ_s within the chunk
        B_row = B_ptr + pid_b * s_Bb + (t0 + tt) * s_Bl
        local = tl.zeros((S_PAD, BLOCK_D), dtype=tl.float32)
        for n in range(0, S):
            An = tl.load(A_ptr + offs_d * s_Ad + (n - N_ONES) * s_An, mask=mask_d & (n >= N_ONES), other=0.0)
            Bn = tl.load(B_row + n * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
            v = tl.sum(tl.exp(after * An.to(tl.float32)[:, None]) * w * Bn[None, :], axis=1)
            local = tl.where(nn[:, None] == n, v[None, :], local)
        if HAS_SEQ_IDX:
            H = keep_c * tl.exp(A2 * total[None, :]) * H + local
        else:
            H = tl.exp(A2 * total[None, :]) * H + local
        sdt += total
    base = pid_b * tl.cdiv(n_chunks, SEG_CHUNKS) + seg
    tl.store(H_ptr + (base * S + nn[:, None]) * d + offs_d[None, :], H, mask=(nn < S)[:, None] & mask_d[None, :])
    tl.store(sdt_ptr + base * d + offs_d, sdt, mask=mask_d)
    if HAS_SEQ_IDX:
        tl.store(keep_ptr + base, keep_seg)


@jit(do_not_specialize=(*_NOT_SPECIALIZED, "segs_per"))
def _scan_fwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, q_ptr, H_ptr, sdt_ptr, keep_ptr, y_ptr,
    state_ptr, hseg_ptr,
    d, L, n_chunks, segs_per,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_h0b, s_h0d, s_h0n,
    s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_qb, s_ql,
    N_ONES: tl.constexpr, N_SCAN: tl.constexpr, N_ZEROS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    SAVE: tl.constexpr, SPLIT: tl.constexpr, SEG_CHUNKS: tl.constexpr, S_PAD: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, TILE3D: tl.constexpr = False, N1_PAD: tl.constexpr = 1, NS_PAD: tl.constexpr = 1,
    NZ_PAD: tl.constexpr = 1,
):
    """The forward. TILE3D=False (shipped): per chunk, a loop of (BLOCK_D, CHUNK) pair scans, one per carried channel,
    the state carried in ``state``. TILE3D=True (the variant, ``tile="3d"``): per chunk one (CHUNK, BLOCK_D, NS_PAD)
    tile of the scan channels (and one (CHUNK, BLOCK_D, N1_PAD) of the ones channels) and a single associative_scan
    along time; time is the tile's slowest axis, so each thread holds the whole chunk of its (channel, state) pairs
    and the scan runs in its registers; the carried state is a register tile (``state`` only hands it in and out)."""
    pid_b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D  # tiles: an int64 base offset plus small int32 offsets
    dd = tl.arange(0, BLOCK_D)
    offs_d = tl.program_id(1) * BLOCK_D + dd
    mask_d = offs_d < d
    tt = tl.arange(0, CHUNK)
    S = N_ONES + N_SCAN  # carried state channels: [ones, scan channels]
    # This program's piece of L: segs_per segments of SEG_CHUNKS chunks (all of L unless the forward is split)
    piece = tl.program_id(2)
    c_lo = piece * segs_per * SEG_CHUNKS
    # The carried state lives in this program's (S, BLOCK_D) slices of ``state`` (b, pieces, 2, S, d), L1/L2-resident
    # (a register tile indexed by a loop variable would need a layout conversion per channel): chunk c reads slot
    # c % 2 and writes the other, so reads and writes never alias within a chunk.
    carry = state_ptr + (pid_b * tl.num_programs(2) + piece) * 2 * S * d + offs_d
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    nn = tl.arange(0, S_PAD)
    rows = (nn < S)[:, None] & mask_d[None, :]
    h = tl.zeros((S_PAD, BLOCK_D), dtype=tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * s_h0b + offs_d[None, :] * s_h0d + nn[:, None] * s_h0n, mask=rows,
                    other=0.0).to(tl.float32)
    if SPLIT:  # the start state: the segments before this piece folded in (their end states from _scan_seg_kernel)
        A2 = _decays(A_ptr, s_Ad, s_An, offs_d, mask_d, nn, N_ONES, S)
        for sg in range(0, piece * segs_per):
            base = pid_b * tl.cdiv(n_chunks, SEG_CHUNKS) + sg
            P = tl.exp(A2 * tl.load(sdt_ptr + base * d + offs_d, mask=mask_d, other=0.0)[None, :])
            if HAS_SEQ_IDX:  # a document start in the segment: the state before it is dropped
                P = P * tl.load(keep_ptr + base)
            h = P * h + tl.load(H_ptr + (base * S + nn[:, None]) * d + offs_d[None, :], mask=rows, other=0.0)
    tl.store(carry + (c_lo % 2) * S * d + nn[:, None] * d, h, mask=rows)
    tl.debug_barrier()
    if HAS_SEQ_IDX:
        q_row = q_ptr + pid_b * s_qb  # this batch's document index per position
    c_hi = tl.minimum(c_lo + segs_per * SEG_CHUNKS, n_chunks)
    if TILE3D:
        # The start state back from the carry slot as register tiles: (BLOCK_D, NS_PAD) scan channels and
        # (BLOCK_D, N1_PAD) ones channels (one load per program; the prologue above is shared with the 2-D loop)
        ns = tl.arange(0, NS_PAD)
        n1 = tl.arange(0, N1_PAD)
        nz = tl.arange(0, NZ_PAD)
        rows_s = mask_d[:, None] & (ns < N_SCAN)[None, :]
        rows_1 = mask_d[:, None] & (n1 < N_ONES)[None, :]
        slot = carry[:, None] + (c_lo % 2) * S * d
        h = tl.load(slot + (N_ONES + ns[None, :]) * d, mask=rows_s, other=0.0)
        h1 = tl.load(slot + n1[None, :] * d, mask=rows_1, other=0.0)
        A = tl.load(A_ptr + offs_d[:, None] * s_Ad + ns[None, :] * s_An, mask=rows_s, other=0.0).to(tl.float32)
        B_s = B_ptr + pid_b * s_Bb + (N_ONES + ns[None, :]) * s_Bn  # (time, state) tiles of B and C, per kind
        C_s = C_ptr + pid_b * s_Cb + (N_ONES + ns[None, :]) * s_Cn
        B_1 = B_ptr + pid_b * s_Bb + n1[None, :] * s_Bn
        C_1 = C_ptr + pid_b * s_Cb + n1[None, :] * s_Cn
        B_z = B_ptr + pid_b * s_Bb + (S + nz[None, :]) * s_Bn
        C_z = C_ptr + pid_b * s_Cb + (S + nz[None, :]) * s_Cn
        last = (tt == CHUNK - 1)[:, None, None]
        for c in range(c_lo, c_hi):
            t0 = tl.cast(c, tl.int64) * CHUNK  # int64: t0 times the time stride may pass 2^31
            mask_t = t0 + tt < L
            mask = mask_t[:, None] & mask_d[None, :]  # (time, channel) tiles
            dt = _load_dt(dt_ptr + (pid_b * s_tb + d0 * s_td + t0 * s_tl) + tt[:, None] * s_tl + dd[None, :] * s_td,
                          bias[None, :], mask, HAS_BIAS, SOFTPLUS)
            x = tl.load(u_ptr + (pid_b * s_ub + d0 * s_ud + t0 * s_ul) + tt[:, None] * s_ul + dd[None, :] * s_ud,
                        mask=mask, other=0.0).to(tl.float32)
            w = dt * x
            if SAVE:  # the state at every SEG_CHUNKS-th chunk start, the backward's recomputation points
                h_seg = hseg_ptr + (pid_b * tl.cdiv(n_chunks, SEG_CHUNKS) + c // SEG_CHUNKS) * S * d + offs_d[:, None]
                keep = c % SEG_CHUNKS == 0
                tl.store(h_seg + (N_ONES + ns[None, :]) * d, h, mask=rows_s & keep)
                tl.store(h_seg + n1[None, :] * d, h1, mask=rows_1 & keep)
            y = tl.zeros((CHUNK, BLOCK_D), dtype=tl.float32)
            if HAS_D:
                y = x * Dv[None, :]
            t_col = (t0 + tt)[:, None]
            if HAS_SEQ_IDX:  # a = 0 at a document start, for every carried channel
                rst = _resets(q_row, s_ql, t0, tt, mask_t)[:, None, None]
            # learned channels (and reference-mode zeros): one pair scan of a_t = exp(Δ_t A), b_t = Δ_t B_t u_t
            Bt = tl.load(B_s + t_col * s_Bl, mask=mask_t[:, None] & (ns < N_SCAN)[None, :], other=0.0).to(tl.float32)
            Ct = tl.load(C_s + t_col * s_Cl, mask=mask_t[:, None] & (ns < N_SCAN)[None, :], other=0.0).to(tl.float32)
            a = tl.exp(dt[:, :, None] * A[None, :, :])
            if HAS_SEQ_IDX:
                a = tl.where(rst, 0.0, a)
            decay, hs = tl.associative_scan((a, w[:, :, None] * Bt[:, None, :]), 0, _pair)
            hs += decay * h[None, :, :]
            y += tl.sum(hs * Ct[:, None, :], axis=2)
            h = tl.sum(tl.where(last, hs, 0.0), axis=0)  # the chunk's last step (past L: a = 1, input 0)
            if N_ONES > 0:  # a = 1: h_t = h_start + Σ_{s≤t} Δ_s B_s u_s
                B1 = tl.load(B_1 + t_col * s_Bl, mask=mask_t[:, None] & (n1 < N_ONES)[None, :],
                             other=0.0).to(tl.float32)
                C1 = tl.load(C_1 + t_col * s_Cl, mask=mask_t[:, None] & (n1 < N_ONES)[None, :],
                             other=0.0).to(tl.float32)
                b1 = w[:, :, None] * B1[:, None, :]
                if HAS_SEQ_IDX:  # a segmented cumulative sum: the pair scan with a = 0 at document starts
                    decay1, hs1 = tl.associative_scan((tl.broadcast_to(tl.where(rst, 0.0, 1.0), b1.shape), b1), 0,
                                                      _pair)
                    hs1 += decay1 * h1[None, :, :]
                else:
                    hs1 = tl.cumsum(b1, axis=0) + h1[None, :, :]
                y += tl.sum(hs1 * C1[:, None, :], axis=2)
                h1 = tl.sum(tl.where(last, hs1, 0.0), axis=0)
            if N_ZEROS > 0:  # exact zeros, a = 0: h_t = Δ_t B_t u_t
                Bz = tl.load(B_z + t_col * s_Bl, mask=mask_t[:, None] & (nz < N_ZEROS)[None, :],
                             other=0.0).to(tl.float32)
                Cz = tl.load(C_z + t_col * s_Cl, mask=mask_t[:, None] & (nz < N_ZEROS)[None, :],
                             other=0.0).to(tl.float32)
                y += w * tl.sum(Bz * Cz, axis=1)[:, None]
            if HAS_Z:
                zz = tl.load(z_ptr + (pid_b * s_zb + d0 * s_zd + t0 * s_zl) + tt[:, None] * s_zl + dd[None, :] * s_zd,
                             mask=mask, other=0.0).to(tl.float32)
                y = y * zz * tl.sigmoid(zz)
            tl.store(y_ptr + (pid_b * s_yb + d0 * s_yd + t0 * s_yl) + tt[:, None] * s_yl + dd[None, :] * s_yd,
                     y.to(y_ptr.dtype.element_ty), mask=mask)
        slot = carry[:, None] + (c_hi % 2) * S * d  # the end state where the 2-D loop leaves it
        tl.store(slot + (N_ONES + ns[None, :]) * d, h, mask=rows_s)
        tl.store(slot + n1[None, :] * d, h1, mask=rows_1)
    else:
        for c in range(c_lo, c_hi):
            t0 = tl.cast(c, tl.int64) * CHUNK  # int64: t0 times the time stride may pass 2^31
            mask_t = t0 + tt < L
            mask = mask_d[:, None] & mask_t[None, :]
            dt = _load_dt(dt_ptr + (pid_b * s_tb + d0 * s_td + t0 * s_tl) + dd[:, None] * s_td + tt[None, :] * s_tl,
                          bias[:, None], mask, HAS_BIAS, SOFTPLUS)
            x = tl.load(u_ptr + (pid_b * s_ub + d0 * s_ud + t0 * s_ul) + dd[:, None] * s_ud + tt[None, :] * s_ul,
                        mask=mask, other=0.0).to(tl.float32)
            w = dt * x
            h_in = carry + (c % 2) * S * d
            h_out = carry + ((c + 1) % 2) * S * d
            if SAVE:  # the state at every SEG_CHUNKS-th chunk start, the backward's recomputation points
                h_seg = hseg_ptr + (pid_b * tl.cdiv(n_chunks, SEG_CHUNKS) + c // SEG_CHUNKS) * S * d + offs_d
                keep = mask_d & (c % SEG_CHUNKS == 0)
            y = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)
            if HAS_D:
                y = Dv[:, None] * x
            if HAS_SEQ_IDX:  # a = 0 at a document start, for every carried channel
                rst = tl.broadcast_to(_resets(q_row, s_ql, t0, tt, mask_t)[None, :], (BLOCK_D, CHUNK))
            B_row = B_ptr + pid_b * s_Bb + (t0 + tt) * s_Bl
            C_row = C_ptr + pid_b * s_Cb + (t0 + tt) * s_Cl
            for n in range(0, N_ONES):  # a = 1: h_t = h_start + Σ_{s≤t} Δ_s B_s u_s
                Bn = tl.load(B_row + n * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
                Cn = tl.load(C_row + n * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
                h_start = tl.load(h_in + n * d, mask=mask_d, other=0.0)
                if SAVE:
                    tl.store(h_seg + n * d, h_start, mask=keep)
                if HAS_SEQ_IDX:  # a segmented cumulative sum: the pair scan with a = 0 at document starts
                    decay, hs = tl.associative_scan((tl.where(rst, 0.0, 1.0), w * Bn[None, :]), 1, _pair)
                    hs += decay * h_start[:, None]
                else:
                    hs = tl.cumsum(w * Bn[None, :], axis=1) + h_start[:, None]
                y += hs * Cn[None, :]
                tl.store(h_out + n * d, _column(hs, tt, CHUNK - 1), mask=mask_d)
            for n in range(0, N_SCAN):  # learned channels (and reference-mode zeros): the pair scan
                j = N_ONES + n
                An = tl.load(A_ptr + offs_d * s_Ad + n * s_An, mask=mask_d, other=0.0).to(tl.float32)
                Bn = tl.load(B_row + j * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
                Cn = tl.load(C_row + j * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
                h_start = tl.load(h_in + j * d, mask=mask_d, other=0.0)
                if SAVE:
                    tl.store(h_seg + j * d, h_start, mask=keep)
                a = tl.exp(dt * An[:, None])
                if HAS_SEQ_IDX:
                    a = tl.where(rst, 0.0, a)
                decay, hs = tl.associative_scan((a, w * Bn[None, :]), 1, _pair)
                hs += decay * h_start[:, None]
                y += hs * Cn[None, :]
                tl.store(h_out + j * d, _column(hs, tt, CHUNK - 1), mask=mask_d)
            for n in range(0, N_ZEROS):  # exact zeros, a = 0: h_t = Δ_t B_t u_t
                Bn = tl.load(B_row + (S + n) * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
                Cn = tl.load(C_row + (S + n) * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
                y += w * (Bn * Cn)[None, :]
            if HAS_Z:
                zz = tl.load(z_ptr + (pid_b * s_zb + d0 * s_zd + t0 * s_zl) + dd[:, None] * s_zd + tt[None, :] * s_zl,
                             mask=mask, other=0.0).to(tl.float32)
                y = y * zz * tl.sigmoid(zz)
            tl.store(y_ptr + (pid_b * s_yb + d0 * s_yd + t0 * s_yl) + dd[:, None] * s_yd + tt[None, :] * s_yl,
                     y.to(y_ptr.dtype.element_ty), mask=mask)
            tl.debug_barrier()  # this chunk's carried states are visible to every thread of the next


@jit(do_not_specialize=_NOT_SPECIALIZED)
def _scan_adj_kernel(
    dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, q_ptr, gy_ptr, Q_ptr, sdt_ptr, keep_ptr,
    d, L, n_chunks, seg_lo,
    s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_Ad, s_An, s_Cb, s_Cn, s_Cl, s_qb, s_ql,
    N_ONES: tl.constexpr, N_SCAN: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, SEG_CHUNKS: tl.constexpr, S_PAD: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The state-passing pass of an L-split backward, per (batch, channel block, segment seg_lo + z): the adjoint a
    segment hands the one before it from a zero adjoint after it, Q = Σ_t exp(A Σ_{s≤t} Δ_s) C_t g_t (Σ over the
    segment's steps so far; g = dy·SiLU(z)), and its ΣΔ (it passes a later adjoint on times exp(A ΣΔ)). With
    seq_idx only the steps before the segment's first document start reach the state before it, and ``keep``
    (b, segments) is 0 for a segment holding one (the later adjoint stops there)."""
    pid_b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D
    seg = seg_lo + tl.program_id(2)
    dd = tl.arange(0, BLOCK_D)
    offs_d = tl.program_id(1) * BLOCK_D + dd
    mask_d = offs_d < d
    tt = tl.arange(0, CHUNK)
    nn = tl.arange(0, S_PAD)
    S = N_ONES + N_SCAN
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    Q = tl.zeros((S_PAD, BLOCK_D), dtype=tl.float32)
    sdt = tl.zeros((BLOCK_D,), dtype=tl.float32)
    alive = tl.full((), 1.0, tl.float32)  # 0 once a document start was met in the segment
    if HAS_SEQ_IDX:
        q_row = q_ptr + pid_b * s_qb  # this batch's document index per position
    c_lo = seg * SEG_CHUNKS
    for c in range(c_lo, tl.minimum(c_lo + SEG_CHUNKS, n_chunks)):
        t0 = tl.cast(c, tl.int64) * CHUNK
        mask_t = t0 + tt < L
        mask = mask_d[:, None] & mask_t[None, :]
        dt = _load_dt(dt_ptr + (pid_b * s_tb + d0 * s_td + t0 * s_tl) + dd[:, None] * s_td + tt[None, :] * s_tl,
                      bias[:, None], mask, HAS_BIAS, SOFTPLUS)
        g = tl.load(gy_ptr + (pid_b * s_yb + d0 * s_yd + t0 * s_yl) + dd[:, None] * s_yd + tt[None, :] * s_yl,
                    mask=mask, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_ptr + (pid_b * s_zb + d0 * s_zd + t0 * s_zl) + dd[:, None] * s_zd + tt[None, :] * s_zl,
                         mask=mask, other=0.0).to(tl.float32)
            g = g * zz * tl.sigmoid(zz)
        if HAS_SEQ_IDX:  # steps at or after the segment's first document start do not reach its start
            first = tl.min(tl.where(_resets(q_row, s_ql, t0, tt, mask_t), tt, CHUNK), axis=0)
            g = tl.where((tt < first)[None, :], g, 0.0) * alive
            alive = alive * tl.where(first < CHUNK, 0.0, 1.0)
        upto = sdt[:, None] + tl.cumsum(dt, axis=1)  # Σ_{s≤t} Δ_s from the segment's start
        C_row = C_ptr + pid_b * s_Cb + (t0 + tt) * s_Cl
        for n in range(0, S):
            An = tl.load(A_ptr + offs_d * s_Ad + (n - N_ONES) * s_An, mask=mask_d & (n >= N_ONES), other=0.0)
            Cn = tl.load(C_row + n * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
            v = tl.sum(tl.exp(upto * An.to(tl.float32)[:, None]) * g * Cn[None, :], axis=1)
            Q = tl.where(nn[:, None] == n, Q + v[None, :], Q)
        sdt += tl.sum(dt, axis=1)
    base = pid_b * tl.cdiv(n_chunks, SEG_CHUNKS) + seg
    tl.store(Q_ptr + (base * S + nn[:, None]) * d + offs_d[None, :], Q, mask=(nn < S)[:, None] & mask_d[None, :])
    tl.store(sdt_ptr + base * d + offs_d, sdt, mask=mask_d)
    if HAS_SEQ_IDX:
        tl.store(keep_ptr + base, alive)


@jit(do_not_specialize=(*_NOT_SPECIALIZED, "segs_per"))
def _scan_bwd_kernel(
    u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, q_ptr, hseg_ptr, gy_ptr, ghlast_ptr, Q_ptr, sdt_ptr,
    keep_ptr, gu_ptr, gdt_ptr, gz_ptr, gA_ptr, gB_ptr, gC_ptr, gD_ptr, gbias_ptr, gstate_ptr, hbuf_ptr,
    d, L, n_chunks, segs_per,
    s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_gb, s_gd, s_gl,
    s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_qb, s_ql,
    N_ONES: tl.constexpr, N_SCAN: tl.constexpr, N_ZEROS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GH: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    SPLIT: tl.constexpr, SEG_CHUNKS: tl.constexpr, S_PAD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    d0 = tl.program_id(1).to(tl.int64) * BLOCK_D  # tiles: an int64 base offset plus small int32 offsets
    dd = tl.arange(0, BLOCK_D)
    offs_d = tl.program_id(1) * BLOCK_D + dd
    mask_d = offs_d < d
    tt = tl.arange(0, CHUNK)
    S = N_ONES + N_SCAN
    n_total = S + N_ZEROS
    n_segs = tl.cdiv(n_chunks, SEG_CHUNKS)
    # This program's piece of L: segs_per segments of SEG_CHUNKS chunks (all of L unless the backward is split)
    piece = tl.program_id(2)
    prog = pid_b * tl.num_programs(2) + piece
    c_lo = piece * segs_per * SEG_CHUNKS
    c_hi = tl.minimum(c_lo + segs_per * SEG_CHUNKS, n_chunks)
    # K = dL/dh at the step before the current chunk's end, carried in two slots of gstate as the forward's
    # state; hbuf holds the chunk-start states of the current segment, recomputed from the one the forward saved
    K_ptr = gstate_ptr + prog * 2 * S * d + offs_d
    hbuf = hbuf_ptr + prog * SEG_CHUNKS * S * d + offs_d
    gA_row = gA_ptr + pid_b * S * d + offs_d
    Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    nn = tl.arange(0, S_PAD)
    rows = (nn < S)[:, None] & mask_d[None, :]
    K = tl.zeros((S_PAD, BLOCK_D), dtype=tl.float32)
    if HAS_GH:
        K = tl.load(ghlast_ptr + pid_b * S * d + nn[:, None] * d + offs_d[None, :], mask=rows, other=0.0)
    if SPLIT:  # the adjoint entering this piece: the segments after it folded in (from _scan_adj_kernel)
        A2 = _decays(A_ptr, s_Ad, s_An, offs_d, mask_d, nn, N_ONES, S)
        for sg in range(0, n_segs - (piece + 1) * segs_per):
            base = pid_b * n_segs + n_segs - 1 - sg
            P = tl.exp(A2 * tl.load(sdt_ptr + base * d + offs_d, mask=mask_d, other=0.0)[None, :])
            if HAS_SEQ_IDX:  # a document start in the segment: the later adjoint stops there
                P = P * tl.load(keep_ptr + base)
            K = P * K + tl.load(Q_ptr + (base * S + nn[:, None]) * d + offs_d[None, :], mask=rows, other=0.0)
    tl.store(K_ptr + ((n_chunks - c_hi) % 2) * S * d + nn[:, None] * d, K, mask=rows)
    gD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    gbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_SEQ_IDX:
        q_row = q_ptr + pid_b * s_qb  # this batch's document index per position
    for ci in range(n_chunks - c_hi, n_chunks - c_lo):  # this piece's chunks, last to first
        c = n_chunks - 1 - ci
        r_last = c % SEG_CHUNKS
        # a segment's last chunk (the first one met) recomputes the segment's chunk starts first; branch-free
        fresh = (r_last == SEG_CHUNKS - 1) | (ci == n_chunks - c_hi)
        c_seg = c - r_last  # the segment's first chunk
        h_seg = hseg_ptr + (pid_b * n_segs + c // SEG_CHUNKS) * S * d + offs_d
        # one (S, BLOCK_D) tile (a loop of S vector copies unrolls and costs ~60 registers)
        copy = (nn < tl.where(fresh, S, 0))[:, None] & mask_d[None, :]
        tl.store(hbuf + nn[:, None] * d, tl.load(h_seg + nn[:, None] * d, mask=copy, other=0.0), mask=copy)
        tl.debug_barrier()
        # Forward sweep: each chunk's end state from its start, h_end = P·h_start + Σ_t (Π_{s>t} a_s) Δ_t B_t u_t
        # with Π_{s>t} a_s = exp(A Σ_{s>t} Δ_s): one sum per channel, no scan (only the last state is needed)
        for r in range(0, tl.where(fresh, r_last, 0)):
            t0 = tl.cast(c_seg + r, tl.int64) * CHUNK
            mask_t = t0 + tt < L
            mask = mask_d[:, None] & mask_t[None, :]
            dt = _load_dt(dt_ptr + (pid_b * s_tb + d0 * s_td + t0 * s_tl) + dd[:, None] * s_td + tt[None, :] * s_tl,
                          bias[:, None], mask, HAS_BIAS, SOFTPLUS)
            w = dt * tl.load(u_ptr + (pid_b * s_ub + d0 * s_ud + t0 * s_ul) + dd[:, None] * s_ud + tt[None, :] * s_ul,
                             mask=mask, other=0.0).to(tl.float32)
            keep_c = 1.0
            if HAS_SEQ_IDX:  # the steps before the chunk's last document start, and h_start, drop out
                p = _last_reset(q_row, s_ql, t0, tt, mask_t)
                w = tl.where((tt >= p)[None, :], w, 0.0)
                keep_c = tl.where(p < 0, 1.0, 0.0)
            total = tl.sum(dt, axis=1)
            after = total[:, None] - tl.cumsum(dt, axis=1)  # Σ_{s>t} Δ_s
            B_row = B_ptr + pid_b * s_Bb + (t0 + tt) * s_Bl
            h_in = hbuf + r * S * d
            h_out = h_in + S * d
            for n in range(0, N_ONES):  # a = 1: plus the chunk's sum
                Bn = tl.load(B_row + n * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
                if HAS_SEQ_IDX:
                    h_end = tl.sum(w * Bn[None, :], axis=1) + keep_c * tl.load(h_in + n * d, mask=mask_d, other=0.0)
                else:
                    h_end = tl.sum(w * Bn[None, :], axis=1) + tl.load(h_in + n * d, mask=mask_d, other=0.0)
                tl.store(h_out + n * d, h_end, mask=mask_d)
            for n in range(0, N_SCAN):
                j = N_ONES + n
                An = tl.load(A_ptr + offs_d * s_Ad + n * s_An, mask=mask_d, other=0.0).to(tl.float32)
                Bn = tl.load(B_row + j * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
                P = tl.exp(total * An)
                if HAS_SEQ_IDX:
                    P = P * keep_c
                h_end = tl.sum(tl.exp(after * An[:, None]) * w * Bn[None, :], axis=1) \
                    + P * tl.load(h_in + j * d, mask=mask_d, other=0.0)
                tl.store(h_out + j * d, h_end, mask=mask_d)
            tl.debug_barrier()
        t0 = tl.cast(c, tl.int64) * CHUNK  # int64: t0 times the time stride may pass 2^31
        mask_t = t0 + tt < L
        mask = mask_d[:, None] & mask_t[None, :]
        dt_tile = dt_ptr + (pid_b * s_tb + d0 * s_td + t0 * s_tl) + dd[:, None] * s_td + tt[None, :] * s_tl
        dt_raw = tl.load(dt_tile, mask=mask, other=0.0).to(tl.float32)
        # Δ one step ahead, for a_{t+1} of the adjoint; the chunk's last column takes a = 1 because the
        # carried K already includes a_{t+1}
        nxt = mask_d[:, None] & ((tt < CHUNK - 1) & (t0 + tt + 1 < L))[None, :]
        dt_next = _load_dt(dt_tile + s_tl, bias[:, None], nxt, HAS_BIAS, SOFTPLUS)
        if HAS_BIAS:
            dt_raw += bias[:, None]
        dt = dt_raw
        if SOFTPLUS:
            dt = _softplus(dt_raw)
        dt = tl.where(mask, dt, 0.0)
        x = tl.load(u_ptr + (pid_b * s_ub + d0 * s_ud + t0 * s_ul) + dd[:, None] * s_ud + tt[None, :] * s_ul,
                    mask=mask, other=0.0).to(tl.float32)
        w = dt * x
        io = (pid_b * s_gb + d0 * s_gd + t0 * s_gl) + dd[:, None] * s_gd + tt[None, :] * s_gl  # gradient tiles
        gy = tl.load(gy_ptr + (pid_b * s_yb + d0 * s_yd + t0 * s_yl) + dd[:, None] * s_yd + tt[None, :] * s_yl,
                     mask=mask, other=0.0).to(tl.float32)
        g = gy
        if HAS_Z:
            zz = tl.load(z_ptr + (pid_b * s_zb + d0 * s_zd + t0 * s_zl) + dd[:, None] * s_zd + tt[None, :] * s_zl,
                         mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zz)
            g = gy * zz * sig
        gD_acc += tl.sum(g * x, axis=1)
        y_pre = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # the pre-gate output, rebuilt for dz
        if HAS_D:
            y_pre = Dv[:, None] * x
        saved = hbuf + r_last * S * d
        K_in = K_ptr + (ci % 2) * S * d
        K_out = K_ptr + ((ci + 1) % 2) * S * d
        gw = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # dL/d(Δ_t u_t)
        gdt_decay = tl.zeros((BLOCK_D, CHUNK), dtype=tl.float32)  # Σ_n A_n · dL/d(Δ_t A_n)
        B_row = B_ptr + pid_b * s_Bb + (t0 + tt) * s_Bl
        C_row = C_ptr + pid_b * s_Cb + (t0 + tt) * s_Cl
        red = (pid_b * n_total) * L + t0 + tt  # row 0 of this batch's dB / dC buffers at this chunk
        if HAS_SEQ_IDX:  # a_t = 0 at a document start; a_{t+1} = 0 before one (the chunk's last column: 1, as Δ)
            rst = tl.broadcast_to(_resets(q_row, s_ql, t0, tt, mask_t)[None, :], (BLOCK_D, CHUNK))
            rst_next = tl.broadcast_to(_resets(q_row, s_ql, t0 + 1, tt, (tt < CHUNK - 1) & (t0 + tt + 1 < L))[None, :],
                                       (BLOCK_D, CHUNK))
        for n in range(0, N_ONES):  # a = 1: forward a cumulative sum, adjoint a reverse one
            Bn = tl.load(B_row + n * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_row + n * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
            if HAS_SEQ_IDX:  # segmented sums: the pair scans with a = 0 at document starts
                decay, hs = tl.associative_scan((tl.where(rst, 0.0, 1.0), w * Bn[None, :]), 1, _pair)
                hs += decay * tl.load(saved + n * d, mask=mask_d, other=0.0)[:, None]
                decay, G = tl.associative_scan((tl.where(rst_next, 0.0, 1.0), g * Cn[None, :]), 1, _pair,
                                               reverse=True)
                G += decay * tl.load(K_in + n * d, mask=mask_d, other=0.0)[:, None]
            else:
                hs = tl.cumsum(w * Bn[None, :], axis=1) + tl.load(saved + n * d, mask=mask_d, other=0.0)[:, None]
                G = tl.cumsum(g * Cn[None, :], axis=1, reverse=True) \
                    + tl.load(K_in + n * d, mask=mask_d, other=0.0)[:, None]
            y_pre += hs * Cn[None, :]
            tl.atomic_add(gC_ptr + red + n * L, tl.sum(g * hs, axis=0), mask=mask_t, sem="relaxed")
            tl.atomic_add(gB_ptr + red + n * L, tl.sum(G * w, axis=0), mask=mask_t, sem="relaxed")
            gw += G * Bn[None, :]
            if HAS_SEQ_IDX:
                tl.store(K_out + n * d, _column(tl.where(rst, 0.0, G), tt, 0), mask=mask_d)
            else:
                tl.store(K_out + n * d, _column(G, tt, 0), mask=mask_d)
        for n in range(0, N_SCAN):
            j = N_ONES + n
            An = tl.load(A_ptr + offs_d * s_Ad + n * s_An, mask=mask_d, other=0.0).to(tl.float32)
            Bn = tl.load(B_row + j * s_Bn, mask=mask_t, other=0.0).to(tl.float32)
            Cn = tl.load(C_row + j * s_Cn, mask=mask_t, other=0.0).to(tl.float32)
            a = tl.exp(dt * An[:, None])
            a_next = tl.exp(dt_next * An[:, None])
            if HAS_SEQ_IDX:
                a = tl.where(rst, 0.0, a)
                a_next = tl.where(rst_next, 0.0, a_next)
            wB = w * Bn[None, :]
            decay, hs = tl.associative_scan((a, wB), 1, _pair)  # the chunk's states, recomputed
            hs += decay * tl.load(saved + j * d, mask=mask_d, other=0.0)[:, None]
            # G_t = g_t C_t + a_{t+1} G_{t+1}, the chunk's last step taking the carried K
            decay, G = tl.associative_scan((a_next, g * Cn[None, :]), 1, _pair, reverse=True)
            G += decay * tl.load(K_in + j * d, mask=mask_d, other=0.0)[:, None]
            y_pre += hs * Cn[None, :]
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
            y_pre += w * (Bn * Cn)[None, :]
        if HAS_Z:
            tl.store(gz_ptr + io, (gy * y_pre * sig * (1.0 + zz * (1.0 - sig))).to(gz_ptr.dtype.element_ty),
                     mask=mask)
        gdt = gw * x + gdt_decay
        if SOFTPLUS:
            gdt = gdt * tl.sigmoid(dt_raw)
        gbias_acc += tl.sum(tl.where(mask, gdt, 0.0), axis=1)
        tl.store(gu_ptr + io, (gw * dt + g * Dv[:, None]).to(gu_ptr.dtype.element_ty), mask=mask)
        tl.store(gdt_ptr + io, gdt.to(gdt_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()
    tl.atomic_add(gD_ptr + pid_b * d + offs_d, gD_acc, mask=mask_d, sem="relaxed")  # the pieces' sum
    tl.atomic_add(gbias_ptr + pid_b * d + offs_d, gbias_acc, mask=mask_d, sem="relaxed")


def config(kind: str, dtype: torch.dtype, d: int, block_d: int | None) -> tuple[int, int, int]:
    """(BLOCK_D, CHUNK, num_warps) for a pass from :data:`CONFIGS`; ``block_d`` overrides (tests shrink it)."""
    bd, chunk, warps = CONFIGS[(kind, min(torch.finfo(dtype).bits // 8, 4))]
    return block_d or min(bd, max(triton.next_power_of_2(d), 2)), chunk, warps


def tile_choice(tile: str | None = None) -> str:
    """The forward's tile: ``tile`` if given, else the POLAR_SCAN_TILE environment variable, else "2d" (the shipped
    loop of 2-D pair scans); "3d" runs one 3-D tile and one associative_scan per chunk (``_scan_fwd_kernel``'s
    TILE3D, both forwards; the backward is the same either way)."""
    tile = tile or os.environ.get("POLAR_SCAN_TILE", "").strip().lower() or "2d"
    if tile not in TILES:
        raise ValueError(f"scan tile {tile!r}: want one of {TILES} (argument tile= or POLAR_SCAN_TILE)")
    return tile


def split_pieces(programs: int, n_segs: int, device: torch.device) -> int:
    """How many pieces of L the forward runs in parallel: enough programs for ~2 waves of SMs (132 on an H100/H200
    when the device cannot be asked), at most one piece per segment; 1 when batch × channel blocks fill them."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return 1 if programs >= 2 * sms else min(n_segs, triton.cdiv(2 * sms, programs))


def _strides3(t):
    return list(t.stride()) if t is not None else [0, 0, 0]


def _strides2(t):
    return list(t.stride()) if t is not None else [0, 0]


class SelectiveScanTriton(torch.autograd.Function):
    """Autograd wrapper: returns (y in u's dtype, last state (b, d, n_ones + N_scan) fp32)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, h0, softplus, n_ones, n_zeros, chunk, block_d, save,
                seg_chunks, pieces, seq_idx=None, tile="2d"):
        b, d, L = u.shape
        n_scan = A.shape[1]
        S = n_ones + n_scan
        tile3d = tile == "3d"
        kind = ("train" if save else "fwd") + ("3d" if tile3d else "")
        fwd_block_d, fwd_chunk, warps = config(kind, u.dtype, d, block_d)
        assert not save or fwd_chunk == config("bwd", u.dtype, d, None)[1], "CONFIGS: train and bwd CHUNK differ"
        chunk = chunk or fwd_chunk
        seg_chunks = seg_chunks or max(1, SAVE_STEPS // chunk)
        n_chunks = triton.cdiv(L, chunk)
        n_segs = triton.cdiv(n_chunks, seg_chunks)
        d_blocks = triton.cdiv(d, fwd_block_d)
        pieces_arg = pieces
        segs_per = triton.cdiv(n_segs, pieces or split_pieces(b * d_blocks, n_segs, u.device))
        pieces = triton.cdiv(n_segs, segs_per)
        y = like(u)
        state = torch.empty(b, pieces, 2, S, d, device=u.device, dtype=torch.float32)
        # the fp32 state at every seg_chunks-th chunk start: the backward recomputes the rest
        hseg = torch.empty(b, n_segs, S, d, device=u.device, dtype=torch.float32) if save else None
        flags = dict(N_ONES=n_ones, N_SCAN=n_scan, N_ZEROS=n_zeros, SOFTPLUS=bool(softplus), HAS_D=D is not None,
                     HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_SEQ_IDX=seq_idx is not None,
                     SEG_CHUNKS=seg_chunks)
        S_PAD = triton.next_power_of_2(S)
        H = sdt = keep = None
        if pieces > 1:  # state passing: every segment's zero-start end state and ΣΔ, for the later pieces to fold in
            H = torch.empty(b, n_segs, S, d, device=u.device, dtype=torch.float32)
            sdt = torch.empty(b, n_segs, d, device=u.device, dtype=torch.float32)
            keep = torch.empty(b, n_segs, device=u.device, dtype=torch.float32) if seq_idx is not None else None
            _scan_seg_kernel[(b, d_blocks, (pieces - 1) * segs_per)](
                u, delta, A, B, delta_bias, seq_idx, H, sdt, keep, d, L, n_chunks, *u.stride(), *delta.stride(),
                *A.stride(), *B.stride(), *_strides2(seq_idx), N_ONES=n_ones, N_SCAN=n_scan, SOFTPLUS=bool(softplus),
                HAS_BIAS=delta_bias is not None, HAS_SEQ_IDX=seq_idx is not None, SEG_CHUNKS=seg_chunks,
                S_PAD=S_PAD, CHUNK=chunk, BLOCK_D=fwd_block_d, num_warps=warps, maxnreg=FWD_MAXNREG)
        _scan_fwd_kernel[(b, d_blocks, pieces)](
            u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, H, sdt, keep, y, state, hseg, d, L, n_chunks, segs_per,
            *u.stride(), *delta.stride(), *_strides3(z), *y.stride(), *_strides3(h0), *A.stride(),
            *B.stride(), *C.stride(), *_strides2(seq_idx), HAS_H0=h0 is not None, SAVE=save, SPLIT=pieces > 1,
            S_PAD=S_PAD, CHUNK=chunk, BLOCK_D=fwd_block_d, num_warps=warps, maxnreg=MAXNREG.get(kind, FWD_MAXNREG),
            **flags,
            **(dict(TILE3D=True, N1_PAD=triton.next_power_of_2(max(n_ones, 1)), NS_PAD=triton.next_power_of_2(
                max(n_scan, 1)), NZ_PAD=triton.next_power_of_2(max(n_zeros, 1))) if tile3d else {}))
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, hseg, seq_idx)
            ctx.flags, ctx.chunk, ctx.block_d, ctx.pieces = flags, chunk, block_d, pieces_arg
        ctx.set_materialize_grads(False)
        return y, state[:, -1, n_chunks % 2].transpose(1, 2)

    @staticmethod
    def backward(ctx, gy, ghlast):
        u, delta, A, B, C, D, z, delta_bias, hseg, seq_idx = ctx.saved_tensors
        flags = ctx.flags
        b, d, L = u.shape
        S, n_total = flags["N_ONES"] + flags["N_SCAN"], B.shape[1]
        block_d, _, warps = config("bwd", u.dtype, d, ctx.block_d)
        chunk = ctx.chunk
        n_chunks = triton.cdiv(L, chunk)
        dev, f32 = u.device, torch.float32
        gy = torch.zeros_like(u) if gy is None else gy
        ghlast = None if ghlast is None else ghlast.float().transpose(1, 2).contiguous()
        gu, gdelta = like(u), like(u, delta.dtype)
        gz = like(u, z.dtype) if z is not None else None
        gA = torch.zeros(b, S, d, device=dev, dtype=f32)
        seg_chunks, S_PAD = flags["SEG_CHUNKS"], triton.next_power_of_2(S)
        n_segs, d_blocks = triton.cdiv(n_chunks, seg_chunks), triton.cdiv(d, block_d)
        segs_per = triton.cdiv(n_segs, ctx.pieces or split_pieces(b * d_blocks, n_segs, u.device))
        pieces = triton.cdiv(n_segs, segs_per)
        gstate = torch.empty(b, pieces, 2, S, d, device=dev, dtype=f32)
        hbuf = torch.empty(b, pieces, seg_chunks, S, d, device=dev, dtype=f32)  # each piece's segment chunk starts
        gB, gC = (torch.zeros(b, n_total, L, device=dev, dtype=f32) for _ in range(2))
        gD, gbias = (torch.zeros(b, d, device=dev, dtype=f32) for _ in range(2))
        assert gz is None or gu.stride() == gz.stride() == gdelta.stride()
        Q = sdt = keep = None
        if pieces > 1:  # state passing: each later segment's adjoint from a zero one after it, and its ΣΔ
            Q = torch.empty(b, n_segs, S, d, device=dev, dtype=f32)
            sdt = torch.empty(b, n_segs, d, device=dev, dtype=f32)
            keep = torch.empty(b, n_segs, device=dev, dtype=f32) if seq_idx is not None else None
            _scan_adj_kernel[(b, d_blocks, n_segs - segs_per)](
                delta, A, C, z, delta_bias, seq_idx, gy, Q, sdt, keep, d, L, n_chunks, segs_per, *delta.stride(),
                *_strides3(z), *gy.stride(), *A.stride(), *C.stride(), *_strides2(seq_idx), N_ONES=flags["N_ONES"],
                N_SCAN=flags["N_SCAN"], SOFTPLUS=flags["SOFTPLUS"], HAS_Z=flags["HAS_Z"], HAS_BIAS=flags["HAS_BIAS"],
                HAS_SEQ_IDX=flags["HAS_SEQ_IDX"], SEG_CHUNKS=seg_chunks, S_PAD=S_PAD, CHUNK=chunk, BLOCK_D=block_d,
                num_warps=warps)
        _scan_bwd_kernel[(b, d_blocks, pieces)](
            u, delta, A, B, C, D, z, delta_bias, seq_idx, hseg, gy, ghlast, Q, sdt, keep,
            gu, gdelta, gz, gA, gB, gC, gD, gbias, gstate, hbuf, d, L, n_chunks, segs_per,
            *u.stride(), *delta.stride(), *_strides3(z), *gy.stride(), *gu.stride(), *A.stride(),
            *B.stride(), *C.stride(), *_strides2(seq_idx), HAS_GH=ghlast is not None, SPLIT=pieces > 1, S_PAD=S_PAD,
            CHUNK=chunk, BLOCK_D=block_d, num_warps=warps, **flags)
        need = ctx.needs_input_grad
        grad = lambda i, g, like_: g.to(like_.dtype) if need[i] else None
        n1 = flags["N_ONES"]
        return (gu, gdelta, grad(2, gA.sum(0)[n1:S].t(), A), grad(3, gB, B), grad(4, gC, C),
                grad(5, gD.sum(0), D), gz, grad(7, gbias.sum(0), delta_bias),
                gstate[:, 0, n_chunks % 2].transpose(1, 2) if need[8] else None, *[None] * 10)


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact", return_last_state=False, initial_state=None,
    chunk_size=None, block_d=None, seg_chunks=None, pieces=None, seq_idx=None, tile=None,
):
    """Triton selective scan; arguments as :func:`kernels.scan_ref.selective_scan_chunked`, plus
    ``initial_state`` (b, d, N_total) to continue from (fp32). ``chunk_size``, ``block_d`` and ``seg_chunks``
    (chunks per saved state and per piece of an L split) override the shipped tiles, ``pieces`` the number of
    programs the forward splits L into (default :func:`split_pieces`); tests shrink them. ``seq_idx`` (b, L) int,
    non-decreasing: the document of every position; a position whose seq_idx differs from the previous one's
    starts from a zero state (``initial_state`` reaches only the first document). ``tile``: the forward's tile,
    "2d" (default) or "3d" (:func:`tile_choice`; None reads POLAR_SCAN_TILE)."""
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
    if seq_idx is not None:
        assert seq_idx.shape == (u.shape[0], u.shape[-1]), f"seq_idx {tuple(seq_idx.shape)}: want (batch, L)"
        seq_idx = seq_idx.to(device=u.device, dtype=torch.int32)
    y, h = SelectiveScanTriton.apply(u, delta, A_scan, B, C, D, z, delta_bias, h0, delta_softplus, n_ones,
                                     exact_zeros, chunk_size, block_d, save, seg_chunks, pieces, seq_idx,
                                     tile_choice(tile))
    if not return_last_state:
        return y
    if exact_zeros:  # a = 0: the last state is the last step's input Δ_L B_L u_L (a zero initial state decays)
        w_last = _prepare_dt(delta[..., -1], delta_bias, delta_softplus) * u[..., -1].float()
        h = torch.cat([h, w_last[..., None] * B[:, None, S:, -1].float()], dim=-1)
    return y, h
