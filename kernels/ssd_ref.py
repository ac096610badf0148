"""Mamba-2's SSD scan (Dao & Gu 2024, "Transformers are SSMs") in plain PyTorch: a sequential oracle, the
chunked algorithm (the CPU path), one decode step, and the polarized channels around any SSD core.

Per head h (one scalar decay A_h < 0 for all its state channels), head channel p and state channel n:

    a_t = exp(Δ_t·A_h),   h_t[p, n] = a_t·h_{t-1}[p, n] + Δ_t·x_t[p]·B_t[n],   y_t[p] = <C_t, h_t[p]> + D_h·x_t[p]

B and C are shared by the heads of a group (``n_groups`` groups of n_heads / n_groups consecutive heads).

Polarization (Wang et al. 2025, §4, carried over from Mamba-1): every head gets ``n_ones`` state channels
with a_t ≡ 1 and ``n_zeros`` with a_t ≡ 0 beside its N learned ones; B and C carry the channels in the
order [ones, learned, zeros], as for Mamba-1. The SSD core runs only the learned channels; the fixed ones
are added in closed form by :func:`kernels.scan_ref.polar_channel_terms` (the function the Mamba-1 scan
uses), so any SSD backend (ours, mamba_ssm's Triton kernels) serves a polarized model.

Shapes follow mamba_ssm's ``mamba_chunk_scan_combined``: x (b, L, h, p); dt (b, L, h); A, D, dt_bias (h,);
B, C (b, L, g, N_total); state (b, h, p, N_total). The scan runs in fp32 (fp64 for fp64 inputs, so
gradcheck works); y comes back in x's dtype, the state in the compute dtype.

Document resets (:mod:`kernels.documents`): with ``seq_idx`` (b, L) every channel's state is zeroed before each
packed document's first token, as mamba_ssm's SSD does with its ``seq_idx``: within a chunk a position sees
only its own document's inputs, a chunk's end state only the inputs of the chunk's last document, and the
carried state only positions of the document it came from.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels import documents
from kernels.scan_ref import compute_dtype, discrete_transition, polar_channel_terms


def _prepare_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool) -> torch.Tensor:
    """Δ in the compute dtype: dt (..., h) plus the per-head bias, then softplus."""
    dt = dt.to(compute_dtype(dt))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    return F.softplus(dt) if dt_softplus else dt


def _per_head(t: torch.Tensor, n_heads: int, dim: int) -> torch.Tensor:
    """A group-shared tensor (its group axis at ``dim``) repeated for each head of the group."""
    return t.repeat_interleave(n_heads // t.shape[dim], dim=dim)


def _no_autocast(fn):
    """Run ``fn`` with autocast off: the scan is fp32 whatever the activations (bf16 AMP would otherwise turn its
    einsums, and so the carried state, into bf16 matmuls)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        with torch.autocast(device.type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


@_no_autocast
def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, n_ones=0, n_zeros=0):
    """One recurrent step (decoding): state (b, h, p, N_total) in the compute dtype; x (b, h, p); dt (b, h);
    B, C (b, g, N_total). Returns (y (b, h, p) in x's dtype, new_state). Also builds the oracle."""
    h, n_total = A.shape[0], B.shape[-1]
    dt = _prepare_dt(dt, dt_bias, dt_softplus)
    cdt = dt.dtype
    A_heads = A.to(cdt)[:, None].expand(h, n_total - n_ones - n_zeros)
    a = discrete_transition(dt, A_heads, n_ones, n_zeros, "exact")  # (b, h, N_total): [1]*ones, exp(ΔA), [0]*zeros
    xf = x.to(cdt)
    Bh, Ch = _per_head(B.to(cdt), h, 1), _per_head(C.to(cdt), h, 1)
    new_state = a[:, :, None] * state + (dt[..., None] * xf)[..., None] * Bh[:, :, None]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xf
    return y.to(x.dtype), new_state


def ssd_sequential(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, n_ones=0, n_zeros=0,
                   initial_state=None, return_final_state=False, seq_idx=None):
    """The oracle: :func:`ssd_step` token by token, every channel (polar ones with a_t fixed at 1 / 0), the
    state zeroed at each document start of ``seq_idx``."""
    b, L, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1], dtype=compute_dtype(x)) if initial_state is None else initial_state
    keep = None if seq_idx is None else documents.keep(seq_idx, compute_dtype(x))
    ys = []
    for t in range(L):
        if keep is not None:
            state = state * keep[:, t, None, None, None]
        y, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, dt_bias, dt_softplus, n_ones, n_zeros)
        ys.append(y)
    y = torch.stack(ys, dim=1)
    return (y, state) if return_final_state else y


def chunked_core(x, dt, A, B, C, initial_state=None, seq_idx=None, chunk_size=256):
    """The SSD algorithm (Dao & Gu 2024, §6) on the learned channels: x, dt (Δ after bias and softplus), B,
    C in the compute dtype. Within a chunk of T positions the output is a masked, decay-weighted
    "attention" C_t·B_s·exp(Σ_{s<r≤t} Δ_r A) over the chunk (matmuls); the chunk's end state is the same
    weighting of its inputs; a short recurrence over chunks carries the state, whose contribution to each
    position is C_t·exp(Σ_{r≤t} Δ_r A)·H_chunk. With ``seq_idx`` each of the three weightings is masked to
    one document (module docstring). Plain autograd. Returns (y (b, L, h, p), final state)."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r, T = h // g, chunk_size
    pad = -L % T
    c = (L + pad) // T

    def chunks(t: torch.Tensor, *tail: int) -> torch.Tensor:  # (b, L, ...) -> (b, c, T, ...), zero-padded
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(b, c, T, *tail)

    log_a = chunks(dt * A.to(dt.dtype), g, r)  # log a_t = Δ_t A_h <= 0; padding has a = 1 and no input
    w = chunks(x * dt[..., None], g, r, p)  # Δ_t x_t
    Bc, Cc = chunks(B, g, n), chunks(C, g, n)
    cum = log_a.cumsum(2)  # (b, c, T, g, r): log of the decay from the chunk start through t
    causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[:, :, None, None]
    if seq_idx is not None:  # padding continues the last document; each chunk also knows the position before it
        seq = F.pad(seq_idx, (0, pad), mode="replicate").reshape(b, c, T)
        prev = torch.cat([seq[:, :1, :1], seq[:, :-1, -1:]], dim=1)  # (b, c, 1): the document a carried state is in
        causal = causal & (seq[:, :, :, None] == seq[:, :, None])[..., None, None]  # (b, c, t, s, 1, 1)
    # exp of a masked exponent (not a masked exp): s > t would overflow, and 0 · inf is NaN in the backward
    decay = torch.exp((cum[:, :, :, None] - cum[:, :, None]).masked_fill(~causal, float("-inf")))  # (b,c,t,s,g,r)
    scores = torch.einsum("bctgn,bcsgn->bctsg", Cc, Bc)
    # pairwise products in a fixed order (not einsum's size-dependent path), so what autograd keeps is
    # predictable: pretrain/memory.py's estimate counts it (models/archs.py)
    y = torch.einsum("bctsgr,bcsgrp->bctgrp", scores[..., None] * decay, w)
    to_end = torch.exp(cum[:, :, -1:] - cum)  # decay from s to the chunk end
    from_start = torch.exp(cum)  # decay from the chunk start to t
    chunk_decay = torch.exp(cum[:, :, -1])  # (b, c, g, r)
    if seq_idx is not None:
        to_end = to_end * (seq == seq[:, :, -1:])[..., None, None]
        from_start = from_start * (seq == prev)[..., None, None]
        chunk_decay = chunk_decay * (seq[:, :, -1] == prev[:, :, 0])[..., None, None]
    chunk_states = torch.einsum("bcsgn,bcsgrp->bcgrpn", Bc, to_end[..., None] * w)
    chunk_decay = chunk_decay[..., None, None]  # (b, c, g, r, 1, 1)
    H = x.new_zeros(b, g, r, p, n) if initial_state is None else initial_state.reshape(b, g, r, p, n)
    starts = []
    for i in range(c):
        starts.append(H)
        H = chunk_decay[:, i] * H + chunk_states[:, i]
    y = y + from_start[..., None] * torch.einsum("bctgn,bcgrpn->bctgrp", Cc, torch.stack(starts, 1))
    return y.reshape(b, c * T, h, p)[:, :L], H.reshape(b, h, p, n)


@_no_autocast
def polarized_ssd(core, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, n_ones=0, n_zeros=0,
                  initial_state=None, return_final_state=False, seq_idx=None):
    """SSD with polarized channels around ``core(x, dt, A, B, C, initial_state, seq_idx) -> (y, final_state)``, a
    plain SSD over the learned channels (dt after bias and softplus, compute dtype; resetting at the documents
    of ``seq_idx`` when it is not None). The ones and zeros channels
    are added in closed form, in Mamba-1's (b, d, L) layout with each group's heads as its channels; a
    carried ones state adds <C_t, h0> to every position and to the final state (a_t = 1), a zeros state
    nothing (a_t = 0); with ``seq_idx`` both only within the window's first document. Then D·x."""
    b, L, h, p = x.shape
    g, n_total = B.shape[2], B.shape[3]
    N = n_total - n_ones - n_zeros
    cdt = compute_dtype(x)
    xf, Bf, Cf = x.to(cdt), B.to(cdt), C.to(cdt)
    dt = _prepare_dt(dt, dt_bias, dt_softplus)
    h0 = None if initial_state is None else initial_state.to(cdt)
    learned = slice(n_ones, n_ones + N)
    y, state = core(xf, dt, A.to(cdt), Bf[..., learned], Cf[..., learned],
                    None if h0 is None else h0[..., learned].contiguous(), seq_idx)
    y = y.to(cdt)
    if n_ones or n_zeros:
        # (b, L, g, [r, p] or n) -> (b·g, r·p or n, L): a group's heads share B and C like Mamba-1's channels
        as_channels = lambda t: t.reshape(b, L, g, -1).permute(0, 2, 3, 1).reshape(b * g, -1, L)
        w = as_channels(dt[..., None] * xf)
        ones, zeros = slice(0, n_ones), slice(n_ones + N, n_total)
        rows_seq = None if seq_idx is None else seq_idx.repeat_interleave(g, 0)  # one row per (batch, group)
        dy, h_ones, h_zeros = polar_channel_terms(w, as_channels(Bf[..., ones]), as_channels(Cf[..., ones]),
                                                  as_channels(Bf[..., zeros]), as_channels(Cf[..., zeros]), rows_seq)
        y = y + dy.reshape(b, g, -1, L).permute(0, 3, 1, 2).reshape(b, L, h, p)
        heads = lambda s: s.reshape(b, h, p, -1)  # (b·g, r·p, k) -> (b, h, p, k)
        h_ones = heads(h_ones)
        if h0 is not None and n_ones:
            carried = torch.einsum("bhpk,blhk->blhp", h0[..., :n_ones], _per_head(Cf[..., :n_ones], h, 2))
            h0_ones = h0[..., :n_ones]
            if seq_idx is not None:
                first = documents.before_first_reset(seq_idx).to(cdt)
                carried, h0_ones = carried * first[..., None, None], h0_ones * first[:, -1, None, None, None]
            y = y + carried
            h_ones = h_ones + h0_ones
        state = torch.cat([h_ones, state, heads(h_zeros)], dim=-1)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xf
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y


def ssd_chunked(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, n_ones=0, n_zeros=0,
                initial_state=None, return_final_state=False, chunk_size=256, seq_idx=None):
    """The CPU path: :func:`chunked_core` polarized by :func:`polarized_ssd`; same results as
    :func:`ssd_sequential`."""
    core = functools.partial(chunked_core, chunk_size=chunk_size)
    return polarized_ssd(core, x, dt, A, B, C, D, dt_bias, dt_softplus, n_ones, n_zeros, initial_state,
                         return_final_state, seq_idx)
