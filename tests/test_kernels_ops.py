"""Triton conv1d+SiLU, add+RMSNorm and chunked linear+CE vs the torch references; torch chunked CE vs F.cross_entropy.

Triton kernels run in the interpreter on CPU (TRITON_INTERPRET=1 set per test, read at launch) and
compiled on CUDA (the ``gpu`` params, skipped without CUDA). bf16 cases are compared with the reference
evaluated in fp32 on the same (bf16-rounded) inputs, at bf16 tolerances.
"""

import pytest
import torch
import torch.nn.functional as F

from kernels import conv_ref, loss_ref, norm_ref

triton = pytest.importorskip("triton")

from kernels import conv_triton, loss_triton, norm_triton  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def outputs_and_grads(fn, inputs, cotangents):
    """fn's outputs and the grads of <outputs, cotangents> w.r.t. every input that is not None."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o.float() * c).sum() for o, c in zip(outs, cotangents, strict=False) if c is not None)
    return [*outs, *torch.autograd.grad(loss, [t for t in inputs if isinstance(t, torch.Tensor)])]


def fp32_copies(inputs):
    return [t.detach().float().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]


def assert_matches_reference(triton_fn, ref_fn, inputs, cotangents, dtype, names):
    got = outputs_and_grads(triton_fn, inputs, cotangents)
    want = outputs_and_grads(ref_fn, fp32_copies(inputs), cotangents)
    for name, a, b in zip(names, got, want, strict=False):
        torch.testing.assert_close(a.float(), b, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
    leaves = [t for t in inputs if isinstance(t, torch.Tensor)]
    for name, a, t in zip(names[len(got) - len(leaves) :], got[len(got) - len(leaves) :], leaves, strict=False):
        assert a.dtype == t.dtype, f"grad {name} has dtype {a.dtype}, input {t.dtype}"


# causal depthwise conv1d (+ SiLU): d=5 channels in blocks of 4, L=11 in blocks of 8
CONV_CASES = {
    "silu-k4": (torch.float32, 4, True, "silu"),
    "linear-k3-nobias": (torch.float32, 3, False, None),
    "silu-k2-bf16": (torch.bfloat16, 2, True, "silu"),
}


@pytest.mark.parametrize("case", CONV_CASES)
def test_triton_conv_matches_reference(device, case):
    dtype, k, has_bias, act = CONV_CASES[case]
    x = torch.randn(2, 5, 11, device=device).to(dtype).requires_grad_()
    w = torch.randn(5, k, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True) if has_bias else None
    gy = torch.randn(2, 5, 11, device=device)
    assert_matches_reference(
        lambda *a: conv_triton.causal_conv1d(*a, activation=act, block_d=4, block_l=8),
        lambda *a: conv_ref.causal_conv1d(*a, activation=act),
        [x, w, b], [gy], dtype, ["y", "x", "weight", "bias"])


def test_triton_conv_reads_strided_input(device):
    """The mixer passes a channel-strided view of in_proj's output; no copy is needed."""
    xz = torch.randn(2, 7, 10, device=device)
    x = xz.transpose(1, 2)[:, :, :5].transpose(1, 2)  # (2, 5, 7) view, time stride 10
    w, b = torch.randn(5, 4, device=device), torch.randn(5, device=device)
    want = conv_ref.causal_conv1d(x, w, b)
    torch.testing.assert_close(conv_triton.causal_conv1d(x, w, b), want, **TOL[torch.float32])


@pytest.mark.parametrize("k,act", [(4, "silu"), (3, None), (2, "silu")])
def test_triton_conv_resets_at_document_starts(device, k, act):
    """With seq_idx no tap crosses a document start: y and the grads of x, weight and bias equal each document
    convolved separately (zero left padding) and concatenated. L = 19 in tiles of 8: row 0 has documents of
    1, 2, 5 (crossing the tile start 8), 1, 9 and 1 steps (starts at tile starts 8 and 16 and inside), row 1 starts
    mid-document (seq_idx 7) with one start at 3. Catches a tap read across a document start in the forward, the
    recomputed pre-activation, the gx sum over later positions or the weight partials."""
    lens, first = ([1, 2, 5, 1, 9, 1], [3, 16]), (0, 7)
    seq_idx = torch.stack([torch.repeat_interleave(torch.arange(len(n)) + f, torch.tensor(n))
                           for n, f in zip(lens, first, strict=True)]).to(device=device, dtype=torch.int32)
    x = torch.randn(2, 5, 19, device=device, requires_grad=True)
    w = torch.randn(5, k, device=device, requires_grad=True)
    b = torch.randn(5, device=device, requires_grad=True)
    gy = torch.randn(2, 5, 19, device=device)

    def separate(x, w, b):
        rows = []
        for i, n in enumerate(lens):
            parts = torch.tensor(n).cumsum(0).tolist()
            rows.append(torch.cat([conv_ref.causal_conv1d(x[i : i + 1, :, e - m : e], w, b, activation=act)
                                   for m, e in zip(n, parts, strict=True)], -1))
        return torch.cat(rows)

    got = outputs_and_grads(lambda *a: conv_triton.causal_conv1d(*a, activation=act, seq_idx=seq_idx, block_d=4,
                                                                 block_l=8), [x, w, b], [gy])
    want = outputs_and_grads(separate, [x, w, b], [gy])
    for name, a, e in zip(["y", "x", "weight", "bias"], got, want, strict=True):
        torch.testing.assert_close(a, e, **TOL[torch.float32], msg=lambda m, name=name: f"{name}: {m}")
    # one document (any index) is no reset
    one = torch.full_like(seq_idx, 4)
    torch.testing.assert_close(conv_triton.causal_conv1d(x, w, b, act, seq_idx=one, block_d=4, block_l=8),
                               conv_triton.causal_conv1d(x, w, b, act, block_d=4, block_l=8), **TOL[torch.float32])


# residual add + RMSNorm: 21 rows (not a multiple of the row block), d=10 (not a power of two)
NORM_CASES = {
    "fp32": (torch.float32, torch.float32, True),
    "first-layer-no-residual": (torch.float32, None, True),
    "bf16-x-fp32-residual": (torch.bfloat16, torch.float32, True),
    "residual-grad-unused": (torch.float32, torch.float32, False),
}


@pytest.mark.parametrize("case", NORM_CASES)
def test_triton_add_rmsnorm_matches_reference(device, case):
    x_dtype, r_dtype, use_residual_out = NORM_CASES[case]
    x = torch.randn(3, 7, 10, device=device).to(x_dtype).requires_grad_()
    r = torch.randn(3, 7, 10, device=device).to(r_dtype).requires_grad_() if r_dtype else None
    w = (1 + 0.3 * torch.randn(10, device=device)).requires_grad_()
    g_out, g_res = torch.randn(3, 7, 10, device=device), torch.randn(3, 7, 10, device=device)
    assert_matches_reference(
        lambda *a: norm_triton.add_rmsnorm(*a, 1e-5), lambda *a: norm_ref.add_rmsnorm(*a, 1e-5),
        [x, r, w], [g_out, g_res if use_residual_out else None], x_dtype,
        ["normed", "residual", "x", *(["residual_in"] if r is not None else []), "weight"])


def test_add_rmsnorm_reference_is_transformers_rmsnorm():
    """The reference is transformers' MambaRMSNorm applied to x + residual (the model's previous math)."""
    from transformers.models.mamba.modeling_mamba import MambaRMSNorm

    norm = MambaRMSNorm(12, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x, r = torch.randn(4, 12).bfloat16(), torch.randn(4, 12)
    normed, residual = norm_ref.add_rmsnorm(x, r, norm.weight, 1e-5)
    torch.testing.assert_close(residual, x.float() + r, rtol=0, atol=0)
    torch.testing.assert_close(normed, norm(x.float() + r), rtol=0, atol=0)


# chunked linear + cross-entropy
def ce_inputs(T, d, V, dtype, device, ignore_every=5):
    hidden = torch.randn(T, d, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, d, device=device) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (T,), device=device)
    labels[::ignore_every] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("T,chunk", [(37, 16), (16, 16), (5, 64)])
def test_torch_chunked_linear_ce_equals_cross_entropy(T, chunk):
    hidden, weight, labels = ce_inputs(T, 6, 50, torch.float64, "cpu")
    got = outputs_and_grads(lambda h, w: loss_ref.linear_cross_entropy(h, w, labels, chunk_size=chunk),
                            [hidden, weight], [1.0])
    want = outputs_and_grads(lambda h, w: F.cross_entropy(h @ w.T, labels), [hidden, weight], [1.0])
    for name, a, b in zip(["loss", "hidden", "weight"], got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_torch_chunked_linear_ce_all_ignored_is_nan_like_cross_entropy():
    hidden, weight, labels = ce_inputs(4, 3, 7, torch.float32, "cpu", ignore_every=1)
    assert torch.isnan(loss_ref.linear_cross_entropy(hidden, weight, labels))
    assert torch.isnan(F.cross_entropy(hidden @ weight.T, labels))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_linear_ce_matches_reference(device, dtype, monkeypatch):
    monkeypatch.setattr(loss_triton.TritonChunkCE, "block_v", 32)  # V=100: several blocks, the last partial
    hidden, weight, labels = ce_inputs(37, 8, 100, dtype, device)
    assert_matches_reference(
        lambda h, w: loss_triton.linear_cross_entropy(h, w, labels, chunk_size=16),
        lambda h, w: F.cross_entropy((h @ w.T).float(), labels),
        [hidden, weight], [1.0], dtype, ["loss", "hidden", "weight"])


@pytest.mark.gpu
@pytest.mark.slow
def test_triton_ops_model_sized():
    """Compiled conv, norm and loss kernels at training-like sizes against the references."""
    x = torch.randn(4, 1536, 1024, device="cuda", dtype=torch.bfloat16)
    w, b = torch.randn(1536, 4, device="cuda"), torch.randn(1536, device="cuda")
    torch.testing.assert_close(conv_triton.causal_conv1d(x, w, b).float(),
                               conv_ref.causal_conv1d(x.float(), w, b), **TOL[torch.bfloat16])
    h, r = torch.randn(4096, 768, device="cuda", dtype=torch.bfloat16), torch.randn(4096, 768, device="cuda")
    nw = torch.randn(768, device="cuda")
    for got, want in zip(norm_triton.add_rmsnorm(h, r, nw, 1e-5), norm_ref.add_rmsnorm(h, r, nw, 1e-5), strict=False):
        torch.testing.assert_close(got.float(), want.float(), **TOL[torch.bfloat16])
    hidden, weight, labels = ce_inputs(8192, 768, 50280, torch.bfloat16, "cuda")
    torch.testing.assert_close(loss_triton.linear_cross_entropy(hidden, weight, labels),
                               F.cross_entropy((hidden @ weight.T).float(), labels), rtol=1e-3, atol=1e-3)


def test_triton_linear_ce_keeps_bf16_logits(device, monkeypatch):
    """The row kernels get the matmul's bf16 logits (no fp32 copy) and the gradients come back in bf16."""
    seen = []
    forward, backward_ = loss_triton.TritonChunkCE.forward, loss_triton.TritonChunkCE.backward_
    monkeypatch.setattr(loss_triton.TritonChunkCE, "forward",
                        classmethod(lambda cls, logits, *a: seen.append(logits.dtype) or forward(logits, *a)))
    monkeypatch.setattr(loss_triton.TritonChunkCE, "backward_",
                        classmethod(lambda cls, logits, *a: seen.append(logits.dtype) or backward_(logits, *a)))
    hidden, weight, labels = ce_inputs(20, 8, 40, torch.bfloat16, device)
    loss = loss_triton.linear_cross_entropy(hidden, weight, labels, chunk_size=8)
    gh, gw = torch.autograd.grad(loss, [hidden, weight])
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == torch.bfloat16
    assert seen == [torch.bfloat16] * 6  # 3 chunks forward, 3 backward
