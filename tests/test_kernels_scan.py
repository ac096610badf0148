"""Triton selective scan (interpreter on CPU, compiled on CUDA) and the mamba_ssm composition vs the torch reference.

Kernels decide interpreter vs compiler at launch (kernels/triton_jit.py), so the ``device`` fixture just sets
TRITON_INTERPRET=1 for the CPU case per test; the rest of the suite in the same process never sees it.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernels import scan_cuda, scan_ref, scan_triton  # noqa: E402


def make_inputs(b, d, L, N, n_ones, n_zeros, dtype, device, extras=True):
    """Fresh random leaves: u, Δ, A_log, B, C, D, z, Δ-bias (A = -exp(A_log), so A_log's grad is checked)."""
    act = lambda *s: torch.randn(*s, device=device).to(dtype).requires_grad_()
    par = lambda t: t.to(device, torch.promote_types(dtype, torch.float32)).requires_grad_()
    nt = n_ones + N + n_zeros
    u, delta, B, C = act(b, d, L), act(b, d, L), act(b, nt, L), act(b, nt, L)
    A_log = par(torch.randn(d, N) * 0.5)
    if not extras:
        return [u, delta, A_log, B, C, None, None, None]
    return [u, delta, A_log, B, C, par(torch.randn(d)), act(b, d, L), par(torch.randn(d) * 0.3)]


def scan_outputs_and_grads(fn, inputs, gy, gh, **kw):
    u, delta, A_log, B, C, D, z, bias = inputs
    y, h = fn(u, delta, -torch.exp(A_log), B, C, D, z, bias, bias is not None, return_last_state=True, **kw)
    loss = (y.float() * gy).sum() + ((h * gh).sum() if gh is not None else 0)
    leaves = [t for t in inputs if t is not None]
    return [y, h, *torch.autograd.grad(loss, leaves)]


NAMES = ["y", "last_state", "u", "delta", "A_log", "B", "C", "D", "z", "delta_bias"]
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def assert_all_close(got, want, dtype, names=NAMES):
    for name, a, b in zip(names, got, want, strict=False):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


CASES = {  # (n_ones, n_zeros, zero_mode, dtype, L, chunk): lengths not multiples of the chunk, d=5 vs BLOCK_D=4
    "baseline": (0, 0, "exact", torch.float32, 13, 4),
    "polar-exact": (1, 1, "exact", torch.float32, 13, 4),
    "polar-reference": (1, 2, "reference", torch.float32, 11, 8),
    "two-ones": (2, 0, "exact", torch.float32, 9, 16),
    "polar-exact-bf16": (1, 1, "exact", torch.bfloat16, 10, 4),
    "polar-reference-bf16": (1, 1, "reference", torch.bfloat16, 7, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_triton_scan_matches_reference(device, case):
    n_ones, n_zeros, zero_mode, dtype, L, chunk = CASES[case]
    inputs = make_inputs(2, 5, L, 3, n_ones, n_zeros, dtype, device)
    kw = dict(n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode)
    gy = torch.randn(2, 5, L, device=device)
    gh = torch.randn(2, 5, n_ones + 3 + n_zeros, device=device)
    want = scan_outputs_and_grads(scan_ref.selective_scan_chunked, inputs, gy, gh, **kw)
    got = scan_outputs_and_grads(scan_triton.selective_scan, inputs, gy, gh, chunk_size=chunk, block_d=4, **kw)
    assert_all_close(got, want, dtype)


def test_triton_scan_without_optional_inputs(device):
    """No D, z, Δ-bias or softplus; the final state unused (its gradient is None)."""
    inputs = make_inputs(1, 3, 6, 2, 1, 1, torch.float32, device, extras=False)
    gy = torch.randn(1, 3, 6, device=device)
    want = scan_outputs_and_grads(scan_ref.selective_scan_chunked, inputs, gy, None, n_ones=1, n_zeros=1)
    got = scan_outputs_and_grads(scan_triton.selective_scan, inputs, gy, None, n_ones=1, n_zeros=1, chunk_size=4)
    assert_all_close(got, want, torch.float32, names=NAMES[:7])


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scan_model_sized(dtype):
    """Compiled kernel at a training-like size (several chunks and channel blocks) against the reference."""
    inputs = make_inputs(2, 256, 300, 16, 1, 1, dtype, "cuda")
    with torch.no_grad():
        inputs[1].mul_(0.3).sub_(2.0)  # Δ ≈ softplus(-2): mamba's range
    gy, gh = torch.randn(2, 256, 300, device="cuda"), torch.randn(2, 256, 18, device="cuda")
    kw = dict(n_ones=1, n_zeros=1)
    want = scan_outputs_and_grads(scan_ref.selective_scan_chunked, inputs, gy, gh, **kw)
    got = scan_outputs_and_grads(scan_triton.selective_scan, inputs, gy, gh, **kw)
    tol = TOL[dtype] if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    for name, a, b in zip(NAMES, got, want, strict=False):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("zero_mode,n_ones,n_zeros", [("exact", 1, 1), ("reference", 2, 1), ("exact", 0, 0)])
def test_stock_scan_plus_closed_forms_matches_reference(zero_mode, n_ones, n_zeros):
    """The cuda backend's composition, with the sequential oracle standing in for mamba_ssm's selective_scan_fn."""
    inputs = make_inputs(2, 4, 9, 3, n_ones, n_zeros, torch.float64, "cpu")
    gy, gh = torch.randn(2, 4, 9, dtype=torch.float64), torch.randn(2, 4, n_ones + 3 + n_zeros, dtype=torch.float64)
    kw = dict(n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode)
    stock = scan_ref.selective_scan_sequential
    want = scan_outputs_and_grads(scan_ref.selective_scan_chunked, inputs, gy, gh, **kw)
    got = scan_outputs_and_grads(lambda *a, **k: scan_cuda.selective_scan(stock, *a, **k), inputs, gy, gh, **kw)
    for name, a, b in zip(NAMES, got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
