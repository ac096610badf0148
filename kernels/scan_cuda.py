"""The polarized selective scan around a stock (unpolarized) scan kernel, e.g. mamba_ssm's ``selective_scan_fn``.

The stock kernel runs the learned channels (plus the zero channels as A = -100 in reference mode) with
D = None and z = None; the exact polar channels are added in closed form (:mod:`kernels.scan_ref`'s module
docstring), then D·u and the SiLU(z) gate, all in fp32 PyTorch. Autograd flows through both parts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.scan_ref import REFERENCE_ZERO_A, _prepare_dt, compute_dtype


def selective_scan(
    stock_fn, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact", return_last_state=False,
):
    """``stock_fn`` has mamba_ssm's ``selective_scan_fn`` signature; other arguments as ``scan_ref``."""
    d, N = A.shape
    cdt = compute_dtype(u)  # fp32 (fp64 for fp64 inputs, so tests can be exact)
    scan_A = A.to(cdt)
    if zero_mode == "reference" and n_zeros:
        scan_A = torch.cat([scan_A, scan_A.new_full((d, n_zeros), REFERENCE_ZERO_A)], dim=1)
    n_scan = scan_A.shape[1]
    out = stock_fn(u, delta, scan_A, B[:, n_ones : n_ones + n_scan].contiguous(),
                   C[:, n_ones : n_ones + n_scan].contiguous(), D=None, z=None, delta_bias=delta_bias,
                   delta_softplus=delta_softplus, return_last_state=return_last_state)
    y, h_scan = out if return_last_state else (out, None)
    y = y.to(cdt)
    uf, Bf, Cf = u.to(cdt), B.to(cdt), C.to(cdt)
    w = _prepare_dt(delta, delta_bias, delta_softplus) * uf  # Δ_t u_t
    states = [h_scan]
    if n_ones:  # h_t = Σ_{s≤t} Δ_s B_s u_s
        h_ones = torch.cumsum(w[:, :, None, :] * Bf[:, None, :n_ones], dim=-1)
        y = y + torch.einsum("bdkl,bkl->bdl", h_ones, Cf[:, :n_ones])
        states.insert(0, h_ones[..., -1])
    if n_zeros and zero_mode == "exact":  # h_t = Δ_t B_t u_t
        B_z, C_z = Bf[:, -n_zeros:], Cf[:, -n_zeros:]
        y = y + w * (B_z * C_z).sum(1, keepdim=True)
        states.append(w[:, :, None, -1] * B_z[:, None, :, -1])
    if D is not None:
        y = y + uf * D.to(cdt)[:, None]
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(u.dtype)
    return (y, torch.cat(states, dim=-1)) if return_last_state else y
