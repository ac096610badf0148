"""The selective scan (Mamba-1 SSM) in plain PyTorch: a sequential oracle, a chunked fast path, one decode step.

Recurrence per channel d and state n (Gu & Dao 2023, eq. 2a-2b; discretisation "ZOH for A, Euler for B"):

    a_t = exp(Δ_t · A),   h_t = a_t ⊙ h_{t-1} + Δ_t · B_t · u_t,   y_t = <C_t, h_t> + D · u_t,   y_t *= SiLU(z_t)

Polarization (Wang et al. 2025, §4): ``n_ones`` channels have a_t ≡ 1 and ``n_zeros`` channels a_t ≡ 0.
B and C carry all channels in the order [ones, learned, zeros]. The fixed channels never go through
exp(Δ·A) (A = -inf would make the backward pass 0·inf = NaN); they have closed forms:

    ones:  h_t = Σ_{s≤t} Δ_s B_s u_s          (a cumulative sum)
    zeros: h_t = Δ_t B_t u_t                  (instantaneous)

Document resets (:mod:`kernels.documents`): with ``seq_idx`` every channel's state is zeroed before the first
token of each packed document (a_t -> 0 there), so the ones channel becomes a cumulative sum per document.

``zero_mode="reference"`` instead runs the zero channels as ordinary channels with A = -100, as the
paper's code does (exp(-100·Δ) is not 0 for small Δ), so its numbers can be reproduced.

Shapes follow mamba_ssm's ``selective_scan_fn`` so every backend shares one signature:
u, delta, z: (batch, d, L); A: (d, N) learned channels only (negative); B, C: (batch, N_total, L);
D, delta_bias: (d,). The state is fp32 for fp32/bf16/fp16 inputs (fp64 for fp64, so gradcheck
works); y comes back in u's dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from kernels import documents

REFERENCE_ZERO_A = -100.0  # the paper's code realises A_t = 0 as A = -100


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs, fp64 for fp64 inputs (so gradcheck can verify the backward)."""
    return torch.promote_types(x.dtype, torch.float32)


def _prepare_dt(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    cdt = compute_dtype(delta)
    dt = delta.to(cdt)
    if delta_bias is not None:
        dt = dt + (delta_bias.to(cdt)[..., None] if dt.dim() == 3 else delta_bias.to(cdt))
    return F.softplus(dt) if delta_softplus else dt


def discrete_transition(
    dt: torch.Tensor, A: torch.Tensor, n_ones: int, n_zeros: int, zero_mode: str
) -> torch.Tensor:
    """a_t for every channel: [1]*n_ones ++ exp(Δ·A) ++ ([0] or exp(-100·Δ))*n_zeros.

    dt: (..., d) fp32; A: (d, N). Returns (..., d, n_ones + N + n_zeros).
    """
    learned = torch.exp(dt[..., None] * A.to(dt.dtype))
    ones = learned.new_ones(*learned.shape[:-1], n_ones)
    if zero_mode == "reference":
        zeros = torch.exp(dt[..., None] * REFERENCE_ZERO_A).expand(*learned.shape[:-1], n_zeros)
    else:
        zeros = learned.new_zeros(*learned.shape[:-1], n_zeros)
    return torch.cat([ones, learned, zeros], dim=-1)


def selective_step(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    n_ones: int = 0,
    n_zeros: int = 0,
    zero_mode: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step (decoding). state: (b, d, N_total) fp32; x, dt, z: (b, d); B, C: (b, N_total).

    Returns (y (b, d) in x's dtype, new_state). Functional, so it can also build the oracle scan.
    """
    dt = _prepare_dt(dt, dt_bias, dt_softplus)
    a = discrete_transition(dt, A, n_ones, n_zeros, zero_mode)
    cdt = dt.dtype
    xf = x.to(cdt)
    new_state = a * state + (dt * xf)[..., None] * B.to(cdt)[:, None, :]
    y = (new_state * C.to(cdt)[:, None, :]).sum(-1)
    if D is not None:
        y = y + D.to(cdt) * xf
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype), new_state


def selective_scan_sequential(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact", return_last_state=False, seq_idx=None,
):
    """The oracle: an explicit per-token loop over all channels with a_t fixed at 1 / 0 for polar ones, the
    state zeroed at each document start when ``seq_idx`` is given.

    Slow (autograd through L steps); used by tests and as the definition of correctness.
    """
    b, d, L = u.shape
    state = u.new_zeros(b, d, n_ones + A.shape[1] + n_zeros, dtype=compute_dtype(u))
    keep = None if seq_idx is None else documents.keep(seq_idx, state.dtype)
    ys = []
    for t in range(L):
        if keep is not None:
            state = state * keep[:, t, None, None]
        y, state = selective_step(
            state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D,
            None if z is None else z[..., t], delta_bias, delta_softplus, n_ones, n_zeros, zero_mode,
        )
        ys.append(y)
    y = torch.stack(ys, dim=-1)
    return (y, state) if return_last_state else y


class _ChunkedScan(torch.autograd.Function):
    """Core diagonal scan y_t = <C_t, h_t>, h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t, time-major.

    Forward walks the sequence chunk by chunk: per chunk the transitions and inputs are computed in
    one vectorised pass, the recurrence runs over a cache-resident (b, d, n) state, and y is one
    einsum. Only the state at each chunk start is kept; backward recomputes each chunk's states
    from it (so memory is O(L/T) states, not O(L)) and runs the adjoint recurrence
    G_t = C_t gy_t + a_{t+1} G_{t+1} in reverse.

    Inputs (fp32): u, dt (L, b, d); A (d, n); B, C (L, b, n); keep (L, b) or None: 0 where a document starts
    (the decay a_t is multiplied by it, :mod:`kernels.documents`); h0 (b, d, n) or None (zero): the state to
    continue from. Returns y (L, b, d), h_last (b, d, n).
    """

    @staticmethod
    def _chunk_states(h0, dA, dBu):
        H = dBu  # overwritten in place: H[t] = dA[t] * H[t-1] + dBu[t]
        prev = h0
        for t in range(H.shape[0]):
            H[t].addcmul_(dA[t], prev)
            prev = H[t]
        return H

    @staticmethod
    def _decays(dt, A, keep):
        dA = torch.exp(dt[..., None] * A)
        return dA if keep is None else dA * keep[:, :, None, None]

    @staticmethod
    def forward(ctx, u, dt, A, B, C, keep, h0, chunk_size: int):
        L, b, d = u.shape
        n = A.shape[1]
        y = u.new_empty(L, b, d)
        h = u.new_zeros(b, d, n) if h0 is None else h0.clone()
        starts = list(range(0, L, chunk_size))
        h0s = u.new_empty(len(starts), b, d, n)
        for i, s in enumerate(starts):
            e = min(s + chunk_size, L)
            h0s[i] = h
            dA = _ChunkedScan._decays(dt[s:e], A, None if keep is None else keep[s:e])
            dBu = (dt[s:e] * u[s:e])[..., None] * B[s:e, :, None, :]
            H = _ChunkedScan._chunk_states(h, dA, dBu)
            y[s:e] = torch.einsum("tbdn,tbn->tbd", H, C[s:e])
            h = H[-1].clone()
        ctx.save_for_backward(u, dt, A, B, C, h0s)
        ctx.keep = keep
        ctx.chunk_size = chunk_size
        return y, h

    @staticmethod
    def backward(ctx, gy, gh_last):
        u, dt, A, B, C, h0s = ctx.saved_tensors
        keep = ctx.keep
        T = ctx.chunk_size
        L = u.shape[0]
        gu, gdt, gB, gC = (torch.empty_like(t) for t in (u, dt, B, C))
        gA = torch.zeros_like(A)
        gy = gy.contiguous() if gy is not None else torch.zeros_like(u)
        carry = gh_last if gh_last is not None else torch.zeros_like(h0s[0])  # a_{e} G_{e} into this chunk
        for i in reversed(range(h0s.shape[0])):
            s = i * T
            e = min(s + T, L)
            dA = _ChunkedScan._decays(dt[s:e], A, None if keep is None else keep[s:e])
            w = dt[s:e] * u[s:e]
            H = _ChunkedScan._chunk_states(h0s[i], dA, w[..., None] * B[s:e, :, None, :])
            G = gy[s:e, :, :, None] * C[s:e, :, None, :]
            G[-1] += carry
            for t in range(e - s - 2, -1, -1):
                G[t].addcmul_(dA[t + 1], G[t + 1])
            carry = dA[0] * G[0]
            gC[s:e] = torch.einsum("tbdn,tbd->tbn", H, gy[s:e])
            gB[s:e] = torch.einsum("tbdn,tbd->tbn", G, w)
            gw = torch.einsum("tbdn,tbn->tbd", G, B[s:e])
            H_prev = torch.cat([h0s[i][None], H[:-1]])
            g_dtA = G * H_prev * dA  # d/d(Δ·A) of a_t h_{t-1}
            gdt[s:e] = gw * u[s:e] + torch.einsum("tbdn,dn->tbd", g_dtA, A)
            gu[s:e] = gw * dt[s:e]
            gA += torch.einsum("tbdn,tbd->dn", g_dtA, dt[s:e])
        return gu, gdt, gA, gB, gC, None, carry if ctx.needs_input_grad[6] else None, None


def polar_channel_terms(w, B_ones, C_ones, B_zeros, C_zeros, seq_idx=None):
    """The exact polarized channels in closed form (module docstring) for w = Δ_t u_t (b, d, L) and their B, C
    columns (b, n_ones, L) and (b, n_zeros, L): ones h_t = Σ_{s≤t} w_s B_s (over s in t's document when
    ``seq_idx`` is given), zeros h_t = w_t B_t. Returns what they add to y, <C_t, h_t> (b, d, L), and their last
    states (b, d, n_ones), (b, d, n_zeros). Shared by every backend of the Mamba-1 scan and of Mamba-2's SSD
    (:mod:`kernels.ssd_ref`)."""
    terms = w[:, :, None, :] * B_ones[:, None]
    h_ones = torch.cumsum(terms, -1) if seq_idx is None else documents.segmented_cumsum(terms, seq_idx)
    dy = torch.einsum("bdkl,bkl->bdl", h_ones, C_ones) + w * (B_zeros * C_zeros).sum(1, keepdim=True)
    return dy, h_ones[..., -1], w[:, :, None, -1] * B_zeros[:, None, :, -1]


def polarized_scan(
    core, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact", return_last_state=False, seq_idx=None, initial_state=None,
):
    """The selective scan with polarized channels around ``core(u, dt, A, B, C, seq_idx, h0) -> (y, h_last)``, a
    plain diagonal scan (u, dt: (b, d, L) in the compute dtype, dt after bias and softplus; resetting at the
    documents of ``seq_idx`` when it is not None; continuing from ``h0`` (b, d, n), its channels of
    ``initial_state``, when that is not None). A carried ones state adds <C_t, h0> to y and h0 to the last state
    (a_t = 1; up to the first reset), an exact zeros state nothing. ``core`` runs the
    learned channels (and the zero channels as A = -100 in reference mode); the exact polar channels are
    added in closed form (module docstring), then D·u and the SiLU(z) gate. Any backend whose kernel has
    no polarization (our chunked scan, mamba_ssm's ``selective_scan_fn``) is polarized through this."""
    d = A.shape[0]
    cdt = compute_dtype(u)
    uf = u.to(cdt)
    dt = _prepare_dt(delta, delta_bias, delta_softplus)
    Bf, Cf = B.to(cdt), C.to(cdt)
    A_scan = A.to(cdt)
    if zero_mode == "reference" and n_zeros:
        A_scan = torch.cat([A_scan, A_scan.new_full((d, n_zeros), REFERENCE_ZERO_A)], dim=1)
    n_scan = A_scan.shape[1]
    h0 = None if initial_state is None else initial_state.to(cdt)
    y, h_scan = core(uf, dt, A_scan, Bf[:, n_ones : n_ones + n_scan], Cf[:, n_ones : n_ones + n_scan], seq_idx,
                     None if h0 is None else h0[..., n_ones : n_ones + n_scan].contiguous())
    y = y.to(cdt)
    n_exact_zeros = n_zeros if zero_mode == "exact" else 0
    if n_ones or n_exact_zeros:
        dy, h_ones, h_zeros = polar_channel_terms(dt * uf, Bf[:, :n_ones], Cf[:, :n_ones],
                                                  Bf[:, n_ones + n_scan :], Cf[:, n_ones + n_scan :], seq_idx)
        if h0 is not None and n_ones:
            carried, h0_ones = torch.einsum("bdk,bkl->bdl", h0[..., :n_ones], Cf[:, :n_ones]), h0[..., :n_ones]
            if seq_idx is not None:
                first = documents.before_first_reset(seq_idx).to(cdt)
                carried, h0_ones = carried * first[:, None], h0_ones * first[:, -1, None, None]
            dy, h_ones = dy + carried, h_ones + h0_ones
        y = y + dy
        h_scan = torch.cat([h_ones, h_scan, h_zeros], dim=-1)
    if D is not None:
        y = y + uf * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(u.dtype)
    return (y, h_scan) if return_last_state else y


def initial_state_terms(
    h0, delta, A, C, z=None, delta_bias=None, delta_softplus=False, n_ones=0, n_zeros=0, zero_mode="exact",
    block=256,
):
    """What a scan started from state ``h0`` (b, d, N_total) adds to the same scan started from zero.

    The recurrence is linear in h, so starting from h0 adds P_t ⊙ h0 to every state, with
    P_t = Π_{s≤t} a_s = :func:`discrete_transition` of the cumulative Δ (exp(A·ΣΔ) for learned channels,
    1 for ones, 0 or exp(-100·ΣΔ) for zeros): y_t gains <C_t, P_t ⊙ h0> · SiLU(z_t) and h_L gains
    P_L ⊙ h0. Returns (dy (b, d, L), dh (b, d, N_total)) in the compute dtype. Lets every backend continue
    from a state without a kernel change (mamba_ssm's scan, which has no initial state).
    """
    dt = _prepare_dt(delta, delta_bias, delta_softplus)
    S = dt.cumsum(-1).transpose(1, 2)  # (b, L, d): Σ_{s≤t} Δ_s
    h0, C = h0.to(dt.dtype), C.to(dt.dtype)
    # P is (b, L, d, N_total): built `block` positions at a time so memory stays bounded for long chunks
    dy = torch.cat([torch.einsum("bldn,bdn,bnl->bdl", discrete_transition(S[:, s:s + block], A, n_ones, n_zeros,
                                                                          zero_mode), h0, C[..., s:s + block])
                    for s in range(0, S.shape[1], block)], dim=-1)
    if z is not None:
        dy = dy * F.silu(z.to(dt.dtype))
    return dy, discrete_transition(S[:, -1], A, n_ones, n_zeros, zero_mode) * h0


def _chunked_core(u, dt, A, B, C, seq_idx, h0, chunk_size: int):
    tm = lambda x: x.permute(2, 0, 1).contiguous()  # (b, c, L) -> (L, b, c)
    keep = None if seq_idx is None else documents.keep(seq_idx, u.dtype).t().contiguous()
    y, h = _ChunkedScan.apply(tm(u), tm(dt), A, tm(B), tm(C), keep, h0, chunk_size)
    return y.permute(1, 2, 0), h


def selective_scan_chunked(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact", return_last_state=False, seq_idx=None, chunk_size=16,
    initial_state=None,
):
    """The fast CPU path: same signature and results as :func:`selective_scan_sequential`, plus ``initial_state``
    (b, d, N_total) to continue from (:class:`_ChunkedScan` polarized by :func:`polarized_scan`)."""
    core = functools.partial(_chunked_core, chunk_size=chunk_size)
    return polarized_scan(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, n_ones, n_zeros, zero_mode,
                          return_last_state, seq_idx, initial_state)
