"""The polarized selective scan around a stock (unpolarized) scan kernel, e.g. mamba_ssm's ``selective_scan_fn``.

The stock kernel runs the learned channels (plus the zero channels as A = -100 in reference mode) with
D = None and z = None, on Δ already biased and softplus-ed; :func:`kernels.scan_ref.polarized_scan` adds
the exact polar channels in closed form, D·u and the SiLU(z) gate in fp32 PyTorch. Autograd flows
through both parts. The stock kernel cannot reset at document boundaries (mamba_ssm issue 180), so
:mod:`kernels.dispatch` never sends it a ``seq_idx``.
"""

from __future__ import annotations

from kernels.scan_ref import polarized_scan


def selective_scan(
    stock_fn, u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact", return_last_state=False,
):
    """``stock_fn`` has mamba_ssm's ``selective_scan_fn`` signature; other arguments as ``scan_ref``."""

    def core(uf, dt, A_scan, B_scan, C_scan, seq_idx, h0):
        assert seq_idx is None, "mamba_ssm's selective scan has no document resets: dispatch routes them elsewhere"
        assert h0 is None, "mamba_ssm's selective scan has no initial state: dispatch adds its terms"
        return stock_fn(uf, dt, A_scan, B_scan.contiguous(), C_scan.contiguous(), D=None, z=None,
                        delta_bias=None, delta_softplus=False, return_last_state=True)

    return polarized_scan(core, u, delta, A, B, C, D, z, delta_bias, delta_softplus, n_ones, n_zeros, zero_mode,
                          return_last_state)
