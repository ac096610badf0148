"""Mamba-2's SSD: the chunked algorithm against the sequential recurrence (outputs and every gradient), with and
without a carried state and polar channels; the polar channels against explicit fixed-transition SSDs; the
dispatch op against the reference."""

import pytest
import torch

from kernels import dispatch
from kernels.ssd_ref import ssd_chunked, ssd_sequential, ssd_step

NAMES = ["x", "dt", "A", "B", "C", "D", "dt_bias", "initial_state"]


def make_inputs(b, L, h, p, g, N, n_ones, n_zeros, with_state, dtype=torch.float64):
    n_total = n_ones + N + n_zeros
    x = torch.randn(b, L, h, p, dtype=dtype)
    dt = torch.randn(b, L, h, dtype=dtype) * 0.5
    A = -torch.exp(torch.randn(h, dtype=dtype))
    B = torch.randn(b, L, g, n_total, dtype=dtype)
    C = torch.randn(b, L, g, n_total, dtype=dtype)
    D = torch.randn(h, dtype=dtype)
    bias = torch.randn(h, dtype=dtype) * 0.3
    h0 = torch.randn(b, h, p, n_total, dtype=dtype) if with_state else None
    return [t.requires_grad_() if t is not None else None for t in (x, dt, A, B, C, D, bias, h0)]


def outputs_and_grads(fn, inputs, n_ones, n_zeros, gy, gh, **kw):
    x, dt, A, B, C, D, bias, h0 = inputs
    y, h = fn(x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True, n_ones=n_ones, n_zeros=n_zeros,
              initial_state=h0, return_final_state=True, **kw)
    leaves = [t for t in inputs if t is not None]
    return y, h, torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("n_ones,n_zeros", [(0, 0), (1, 1), (2, 0), (0, 3)])
@pytest.mark.parametrize("L,chunk", [(29, 8), (16, 16), (5, 64), (1, 4)])
def test_chunked_matches_sequential(with_state, n_ones, n_zeros, L, chunk):
    inputs = make_inputs(2, L, 4, 3, 2, 5, n_ones, n_zeros, with_state)
    gy = torch.randn(2, L, 4, 3, dtype=torch.float64)
    gh = torch.randn(2, 4, 3, n_ones + 5 + n_zeros, dtype=torch.float64)
    y1, h1, g1 = outputs_and_grads(ssd_sequential, inputs, n_ones, n_zeros, gy, gh)
    y2, h2, g2 = outputs_and_grads(ssd_chunked, inputs, n_ones, n_zeros, gy, gh, chunk_size=chunk)
    torch.testing.assert_close(y2, y1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h2, h1, rtol=1e-10, atol=1e-10)
    for name, a, b in zip(NAMES, g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"grad {name}: {m}")


def test_sequential_is_the_ssd_recurrence():
    """The oracle against an independent loop over (batch, head, p, n), one scalar decay per head, B/C by group."""
    b, L, h, p, g, N = 1, 6, 4, 2, 2, 3
    x, dt, A, B, C, D, bias, _ = [t.detach() if t is not None else None
                                  for t in make_inputs(b, L, h, p, g, N, 0, 0, False)]
    delta = torch.nn.functional.softplus(dt + bias)
    y = torch.zeros(b, L, h, p, dtype=torch.float64)
    for hh in range(h):
        gg = hh // (h // g)
        for pp in range(p):
            for n in range(N):
                s = 0.0
                for t in range(L):
                    s = torch.exp(delta[0, t, hh] * A[hh]) * s + delta[0, t, hh] * x[0, t, hh, pp] * B[0, t, gg, n]
                    y[0, t, hh, pp] += C[0, t, gg, n] * s
            y[0, :, hh, pp] += D[hh] * x[0, :, hh, pp]
    got = ssd_sequential(x, dt, A, B, C, D=D, dt_bias=bias, dt_softplus=True)
    torch.testing.assert_close(got, y, rtol=1e-10, atol=1e-10)


def test_polar_channels_equal_fixed_transition_ssd():
    """A ones channel is an SSD head whose decay is exactly 1 (A = 0); a zeros channel one whose state is its
    input alone, checked on the polar channels with the learned ones' B, C zeroed."""
    b, L, h, p, g, N = 2, 9, 2, 3, 1, 2
    x, dt, A, B, C, _, bias, _ = [t.detach() if t is not None else None
                                  for t in make_inputs(b, L, h, p, g, N, 1, 1, False)]
    keep = lambda t, cols: t * torch.tensor([1.0 if i in cols else 0.0 for i in range(N + 2)], dtype=t.dtype)
    y = ssd_chunked(x, dt, A, keep(B, {0}), keep(C, {0}), dt_bias=bias, dt_softplus=True, n_ones=1, n_zeros=1,
                    chunk_size=4)
    y_ones = ssd_sequential(x, dt, torch.zeros_like(A), B[..., :1], C[..., :1], dt_bias=bias, dt_softplus=True)
    torch.testing.assert_close(y, y_ones, rtol=1e-10, atol=1e-10)
    y = ssd_chunked(x, dt, A, keep(B, {N + 1}), keep(C, {N + 1}), dt_bias=bias, dt_softplus=True, n_ones=1,
                    n_zeros=1, chunk_size=4)
    delta = torch.nn.functional.softplus(dt + bias)
    y_zeros = (delta[..., None] * x) * (B[..., -1:] * C[..., -1:]).sum(-1)[..., None]  # h_t = Δ_t x_t B_t
    torch.testing.assert_close(y, y_zeros, rtol=1e-10, atol=1e-10)


def test_chunked_prefill_then_steps_equal_one_pass():
    """Split a sequence: chunked over the first part, carried state into a chunked second part, then single steps."""
    x, dt, A, B, C, D, bias, _ = [t.detach() if t is not None else None
                                  for t in make_inputs(2, 23, 4, 2, 1, 3, 1, 1, False)]
    kw = dict(D=D, dt_bias=bias, dt_softplus=True, n_ones=1, n_zeros=1, return_final_state=True)
    y_full, h_full = ssd_chunked(x, dt, A, B, C, chunk_size=8, **kw)
    y1, h = ssd_chunked(x[:, :10], dt[:, :10], A, B[:, :10], C[:, :10], chunk_size=8, **kw)
    y2, h = ssd_chunked(x[:, 10:20], dt[:, 10:20], A, B[:, 10:20], C[:, 10:20], chunk_size=4, initial_state=h, **kw)
    ys = [y1, y2]
    for t in range(20, 23):
        y, h = ssd_step(h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, bias, True, 1, 1)
        ys.append(y[:, None])
    torch.testing.assert_close(torch.cat(ys, 1), y_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_full, rtol=1e-10, atol=1e-10)


def test_dispatch_ssd_in_fp32_and_bf16(monkeypatch):
    """The dispatched op (torch backend on CPU) equals the oracle in fp32; bf16 inputs give bf16 y, fp32 state."""
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    x, dt, A, B, C, D, bias, h0 = [t.detach().float() for t in make_inputs(2, 13, 4, 2, 2, 3, 1, 1, True)]
    kw = dict(D=D, dt_bias=bias, dt_softplus=True, n_ones=1, n_zeros=1, initial_state=h0, return_final_state=True)
    y, h = dispatch.ssd(x, dt, A, B, C, chunk_size=4, **kw)
    y_ref, h_ref = ssd_sequential(x, dt, A, B, C, **kw)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    y16, h16 = dispatch.ssd(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), chunk_size=4, **kw)
    assert y16.dtype == torch.bfloat16 and h16.dtype == torch.float32
    assert dispatch.describe("cpu")["ssd"] == "torch"


def test_scan_stays_fp32_under_bf16_autocast():
    """AMP training must not turn the SSD's einsums (and the carried state) into bf16 matmuls."""
    x, dt, A, B, C, D, bias, h0 = [t.detach().float() for t in make_inputs(2, 21, 4, 2, 2, 3, 1, 1, True)]
    x, B, C = x.bfloat16(), B.bfloat16(), C.bfloat16()
    kw = dict(D=D, dt_bias=bias, dt_softplus=True, n_ones=1, n_zeros=1, initial_state=h0, return_final_state=True)
    y, h = dispatch.ssd(x, dt, A, B, C, chunk_size=8, **kw)
    y1, h1 = dispatch.ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, bias, True, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_amp, h_amp = dispatch.ssd(x, dt, A, B, C, chunk_size=8, **kw)
        y1_amp, h1_amp = dispatch.ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, bias, True, 1, 1)
    assert torch.equal(y_amp, y) and torch.equal(h_amp, h) and h_amp.dtype == torch.float32
    assert torch.equal(y1_amp, y1) and torch.equal(h1_amp, h1)
