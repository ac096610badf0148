"""The chunked scan against the sequential oracle, the closed-form polar channels against explicit scans."""

import pytest
import torch

from kernels.scan_ref import (
    REFERENCE_ZERO_A,
    initial_state_terms,
    selective_scan_chunked,
    selective_scan_sequential,
    selective_step,
)


def make_inputs(b, d, L, N, n_ones, n_zeros, dtype=torch.float64):
    u = torch.randn(b, d, L, dtype=dtype)
    delta = torch.randn(b, d, L, dtype=dtype) * 0.5
    A = -torch.exp(torch.randn(d, N, dtype=dtype))
    B = torch.randn(b, n_ones + N + n_zeros, L, dtype=dtype)
    C = torch.randn(b, n_ones + N + n_zeros, L, dtype=dtype)
    D = torch.randn(d, dtype=dtype)
    z = torch.randn(b, d, L, dtype=dtype)
    bias = torch.randn(d, dtype=dtype) * 0.3
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


def run(fn, inputs, n_ones, n_zeros, zero_mode, **kw):
    u, delta, A, B, C, D, z, bias = inputs
    return fn(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, n_ones=n_ones,
              n_zeros=n_zeros, zero_mode=zero_mode, return_last_state=True, **kw)


def outputs_and_grads(fn, inputs, n_ones, n_zeros, zero_mode, gy, gh, **kw):
    y, h = run(fn, inputs, n_ones, n_zeros, zero_mode, **kw)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), inputs)
    return y, h, grads


NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


@pytest.mark.parametrize("zero_mode", ["exact", "reference"])
@pytest.mark.parametrize("n_ones,n_zeros", [(0, 0), (1, 1), (2, 0), (0, 3)])
@pytest.mark.parametrize("L,chunk", [(37, 8), (16, 16), (5, 64), (1, 4)])
def test_chunked_matches_oracle(zero_mode, n_ones, n_zeros, L, chunk):
    inputs = make_inputs(2, 5, L, 4, n_ones, n_zeros)
    y_ref, h_ref = run(selective_scan_sequential, inputs, n_ones, n_zeros, zero_mode)
    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    y1, h1, g1 = outputs_and_grads(selective_scan_sequential, inputs, n_ones, n_zeros, zero_mode, gy, gh)
    y2, h2, g2 = outputs_and_grads(selective_scan_chunked, inputs, n_ones, n_zeros, zero_mode, gy, gh,
                                   chunk_size=chunk)
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h2, h1, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(NAMES, g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


def test_chunked_gradcheck():
    """The hand-written backward against finite differences."""
    inputs = make_inputs(1, 3, 11, 2, 1, 1)
    fn = lambda *xs: run(selective_scan_chunked, xs, 1, 1, "exact", chunk_size=4)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def naive_scan(u, dt, a, B, C):
    """Independent triple loop over (batch, channel, state) with an explicit transition a (b, d, L, n)."""
    b, d, L = u.shape
    y = torch.zeros(b, d, L, dtype=u.dtype)
    for i in range(b):
        for j in range(d):
            for n in range(B.shape[1]):
                h = 0.0
                for t in range(L):
                    h = a[i, j, t, n] * h + dt[i, j, t] * B[i, n, t] * u[i, j, t]
                    y[i, j, t] += C[i, n, t] * h
    return y


def test_polar_closed_forms_equal_fixed_transition_scan():
    """Ones channel = scan with a_t = 1, zeros channel = scan with a_t = 0, on the channels alone."""
    b, d, L = 2, 3, 9
    u = torch.randn(b, d, L, dtype=torch.float64)
    dt = torch.rand(b, d, L, dtype=torch.float64)
    B = torch.randn(b, 2, L, dtype=torch.float64)
    C = torch.randn(b, 2, L, dtype=torch.float64)
    A = torch.empty(d, 0, dtype=torch.float64)  # no learned channels: only the closed forms act
    y = selective_scan_chunked(u, dt, A, B, C, n_ones=1, n_zeros=1)
    a = torch.stack([torch.ones(b, d, L), torch.zeros(b, d, L)], dim=-1).double()
    torch.testing.assert_close(y, naive_scan(u, dt, a, B, C))


def test_learned_channels_equal_naive_scan():
    b, d, L, N = 2, 3, 7, 3
    u, dt = torch.randn(b, d, L, dtype=torch.float64), torch.rand(b, d, L, dtype=torch.float64)
    A = -torch.rand(d, N, dtype=torch.float64) * 4
    B, C = torch.randn(b, N, L, dtype=torch.float64), torch.randn(b, N, L, dtype=torch.float64)
    a = torch.exp(dt[..., None] * A[None, :, None, :])
    torch.testing.assert_close(selective_scan_chunked(u, dt, A, B, C, chunk_size=3), naive_scan(u, dt, a, B, C))


def test_reference_mode_is_scan_with_a_minus_100():
    b, d, L, N = 2, 4, 13, 3
    u, delta, A, B, C, D, z, bias = (t.detach() for t in make_inputs(b, d, L, N, 1, 2))
    y_ref = selective_scan_chunked(u, delta, A, B, C, D, z, bias, True, n_ones=1, n_zeros=2, zero_mode="reference")
    A_full = torch.cat([A, torch.full((d, 2), REFERENCE_ZERO_A, dtype=A.dtype)], dim=1)
    y_plain = selective_scan_sequential(u, delta, A_full, B, C, D, z, bias, True, n_ones=1, n_zeros=0)
    torch.testing.assert_close(y_ref, y_plain)
    # and it is not the exact zero channel: exp(-100·Δ) ≈ 0.9 for Δ ≈ 1e-3 (mamba's init range)
    small = torch.full_like(delta, -7.0)  # softplus(-7) ≈ 9e-4
    y_ref = selective_scan_chunked(u, small, A, B, C, D, z, None, True, n_ones=1, n_zeros=2, zero_mode="reference")
    y_exact = selective_scan_chunked(u, small, A, B, C, D, z, None, True, n_ones=1, n_zeros=2)
    assert (y_ref - y_exact).abs().max() > 1e-3


def test_state_is_fp32_for_bf16_inputs():
    inputs = [t.detach() for t in make_inputs(2, 8, 40, 4, 1, 1, dtype=torch.float32)]
    u, delta, A, B, C, D, z, bias = inputs
    lowp = [t.to(torch.bfloat16) for t in (u, delta, B, C, z)]
    y, h = selective_scan_chunked(lowp[0], lowp[1], A, lowp[2], lowp[3], D, lowp[4], bias, True,
                                  n_ones=1, n_zeros=1, return_last_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    # same result as an fp64 scan of the bf16-rounded inputs, up to the final bf16 rounding of y
    hi = [t.double() for t in lowp]
    y64 = selective_scan_sequential(hi[0], hi[1], A.double(), hi[2], hi[3], D.double(), hi[4], bias.double(), True,
                                    n_ones=1, n_zeros=1)
    torch.testing.assert_close(y.double(), y64, rtol=1e-2, atol=1e-2)


def test_step_matches_scan_prefix():
    """Recurrent steps from the scan's final state continue the scan."""
    inputs = [t.detach() for t in make_inputs(2, 4, 20, 3, 1, 1)]
    u, delta, A, B, C, D, z, bias = inputs
    kw = dict(n_ones=1, n_zeros=1)
    y_full = selective_scan_chunked(u, delta, A, B, C, D, z, bias, True, **kw)
    _, state = selective_scan_chunked(u[..., :12], delta[..., :12], A, B[..., :12], C[..., :12], D, z[..., :12],
                                      bias, True, return_last_state=True, **kw)
    for t in range(12, 20):
        y, state = selective_step(state, u[..., t], delta[..., t], A, B[..., t], C[..., t], D, z[..., t], bias, True,
                                  **kw)
        torch.testing.assert_close(y, y_full[..., t])


@pytest.mark.parametrize("zero_mode", ["exact", "reference"])
@pytest.mark.parametrize("n_ones,n_zeros", [(0, 0), (1, 1), (2, 3)])
@pytest.mark.parametrize("split", [1, 9, 19])
def test_scan_continues_from_initial_state(zero_mode, n_ones, n_zeros, split):
    """A scan from the state a prefix left equals the rest of the full scan (chunked prefill's contract)."""
    from kernels import dispatch

    inputs = [t.detach() for t in make_inputs(2, 4, 20, 3, n_ones, n_zeros)]
    u, delta, A, B, C, D, z, bias = inputs
    kw = dict(D=D, delta_bias=bias, delta_softplus=True, n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode,
              return_last_state=True)
    y_full, h_full = selective_scan_sequential(u, delta, A, B, C, z=z, **kw)
    head, tail = (lambda t: t[..., :split]), (lambda t: t[..., split:])
    _, h_mid = dispatch.selective_scan(head(u), head(delta), A, head(B), head(C), z=head(z), **kw)
    y, h = dispatch.selective_scan(tail(u), tail(delta), A, tail(B), tail(C), z=tail(z), initial_state=h_mid, **kw)
    torch.testing.assert_close(y, tail(y_full), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_full, rtol=1e-10, atol=1e-10)
    # the same terms built a few positions at a time (how long chunks bound their memory), on the oracle
    y0, h0 = selective_scan_sequential(tail(u), tail(delta), A, tail(B), tail(C), z=tail(z), **kw)
    dy, dh = initial_state_terms(h_mid, tail(delta), A, tail(C), tail(z), bias, True, n_ones, n_zeros, zero_mode,
                                 block=3)
    torch.testing.assert_close(y0 + dy, tail(y_full), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h0 + dh, h_full, rtol=1e-10, atol=1e-10)


def test_initial_state_gradcheck():
    from kernels import dispatch

    u, delta, A, B, C, D, z, bias = make_inputs(1, 3, 7, 2, 1, 1)
    h0 = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)

    def f(u, delta, A, C, z, h0):
        return dispatch.selective_scan(u, delta, A, B, C, D, z, bias, True, n_ones=1, n_zeros=1,
                                       return_last_state=True, initial_state=h0)

    assert torch.autograd.gradcheck(f, (u, delta, A, C, z, h0))
