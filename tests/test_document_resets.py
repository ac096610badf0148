"""Document resets (``seq_idx``, issue 25): a packed window of k documents must give the outputs and every gradient
of running each document on its own from a zero state. Checked for the Mamba-1 scan (sequential oracle and
chunked path; baseline, polarized with both zero modes, a carried initial state), the causal conv, Mamba-2's SSD
(sequential and chunked) and whole models of every architecture; plus the dispatch routing resets away from
mamba_ssm's selective scan, which cannot reset."""

from __future__ import annotations

import functools
import logging

import numpy as np
import pytest
import torch

from kernels import conv_ref, dispatch, documents, scan_ref, ssd_ref
from models.build import build_model
from models.config import ModelConfig
from pretrain.cli import main
from pretrain.data import DistributedSampleLoader, PackedDataset, TokenShards
from tests.data_helpers import random_docs, write_jsonl
from tests.train_helpers import fault_env, losses, ok, preempted, train, write_config

pytest_plugins = ["tests.data_fixtures"]

# document lengths of one window: single-token documents, documents crossing chunk boundaries (chunks of 3 and
# 4 below), a first "document" that is the tail of one begun before the window (seq_idx need not start at 0)
LENGTHS = [[1, 5, 4, 3], [7, 1, 1, 6], [15]]
FIRST = [0, 6, 2]  # seq_idx of each row's first position


def seq_idx_for(lengths, first=0, batch=1):
    row = torch.tensor(sum(([first + i] * n for i, n in enumerate(lengths)), []))
    return row.repeat(batch, 1)


def by_document(fn, lengths, tensors, dim):
    """cat over documents of ``fn(*slices)``: each document run alone from a zero state."""
    bounds = np.cumsum([0, *lengths])
    outs = [fn(*(t.narrow(dim, int(s), int(e - s)) for t in tensors)) for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim)


def assert_same_outputs_and_grads(packed, separate, leaves, names, tol=1e-5):
    """``packed`` and ``separate`` are outputs of the same leaves; compares them and the gradients of a random
    weighting of them with respect to every leaf (fp32: ``tol`` relative to each tensor's scale)."""
    w = torch.randn_like(packed)
    torch.testing.assert_close(packed, separate, rtol=tol, atol=tol * separate.abs().max().item())
    g1 = torch.autograd.grad((packed * w).sum(), leaves)
    g2 = torch.autograd.grad((separate * w).sum(), leaves)
    for name, a, b in zip(names, g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.abs().max().item(), 1e-3),
                                   msg=lambda m, name=name: f"grad {name}: {m}")


def scan_inputs(b, d, L, N, n_total):
    u, delta, z = (torch.randn(b, d, L) for _ in range(3))
    A = -torch.exp(torch.randn(d, N))
    B, C = torch.randn(b, n_total, L), torch.randn(b, n_total, L)
    D, bias = torch.randn(d), torch.randn(d) * 0.3
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


SCANS = {"sequential": scan_ref.selective_scan_sequential,
         "chunked": functools.partial(scan_ref.selective_scan_chunked, chunk_size=3)}


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("n_ones,n_zeros,zero_mode", [(0, 0, "exact"), (1, 1, "exact"), (2, 1, "reference")])
@pytest.mark.parametrize("row", range(len(LENGTHS)))
def test_scan_with_resets_is_each_document_alone(scan, n_ones, n_zeros, zero_mode, row):
    lengths, N = LENGTHS[row], 4
    L = sum(lengths)
    leaves = scan_inputs(2, 3, L, N, n_ones + N + n_zeros)
    u, delta, A, B, C, D, z, bias = leaves
    kw = dict(D=D, delta_bias=bias, delta_softplus=True, n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode)
    fn = SCANS[scan]
    packed = fn(u, delta, A, B, C, z=z, seq_idx=seq_idx_for(lengths, FIRST[row], 2), **kw)
    separate = by_document(lambda u, dl, B, C, z: fn(u, dl, A, B, C, z=z, **kw), lengths, (u, delta, B, C, z), -1)
    assert_same_outputs_and_grads(packed, separate, leaves, ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"])


@pytest.mark.parametrize("n_ones,n_zeros,zero_mode", [(0, 0, "exact"), (1, 1, "exact"), (1, 2, "reference")])
def test_initial_state_reaches_only_the_first_document(n_ones, n_zeros, zero_mode):
    """dispatch.selective_scan continuing from a state with resets (its initial_state terms) against the oracle
    loop started from that state: outputs, the last state and every gradient, the state's included."""
    lengths, N = [4, 1, 5], 3
    n_total, L = n_ones + N + n_zeros, sum(lengths)
    leaves = scan_inputs(2, 3, L, N, n_total) + [torch.randn(2, 3, n_total).requires_grad_()]
    u, delta, A, B, C, D, z, bias, h0 = leaves
    seq_idx = seq_idx_for(lengths, batch=2)
    kw = dict(D=D, delta_bias=bias, delta_softplus=True, n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode)
    y, h = dispatch.selective_scan(u, delta, A, B, C, z=z, seq_idx=seq_idx, initial_state=h0, return_last_state=True,
                                   **kw)
    state, keep, ys = h0, documents.keep(seq_idx, torch.float32), []
    for t in range(L):
        yt, state = scan_ref.selective_step(state * keep[:, t, None, None], u[..., t], delta[..., t], A, B[..., t],
                                            C[..., t], z=z[..., t], dt_bias=bias, dt_softplus=True, D=D,
                                            n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode)
        ys.append(yt)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"]
    assert_same_outputs_and_grads(torch.cat([y.flatten(), h.flatten()]),
                                  torch.cat([torch.stack(ys, -1).flatten(), state.flatten()]), leaves, names)


@pytest.mark.parametrize("row", range(len(LENGTHS)))
def test_conv_with_resets_is_each_document_alone(row):
    lengths = LENGTHS[row]
    x, weight, bias = torch.randn(2, 5, sum(lengths)), torch.randn(5, 4), torch.randn(5)
    leaves = [t.requires_grad_() for t in (x, weight, bias)]
    packed = conv_ref.causal_conv1d(x, weight, bias, seq_idx=seq_idx_for(lengths, FIRST[row], 2))
    separate = by_document(lambda x: conv_ref.causal_conv1d(x, weight, bias), lengths, (x,), -1)
    assert_same_outputs_and_grads(packed, separate, leaves, ["x", "weight", "bias"])


SSDS = {"sequential": ssd_ref.ssd_sequential, "chunked (3)": functools.partial(ssd_ref.ssd_chunked, chunk_size=3),
        "chunked (4)": functools.partial(ssd_ref.ssd_chunked, chunk_size=4)}


@pytest.mark.parametrize("ssd", SSDS)
@pytest.mark.parametrize("n_ones,n_zeros", [(0, 0), (1, 1)])
@pytest.mark.parametrize("row", range(len(LENGTHS)))
def test_ssd_with_resets_is_each_document_alone(ssd, n_ones, n_zeros, row):
    lengths, (h, p, g, N) = LENGTHS[row], (4, 2, 2, 3)
    L, n_total = sum(lengths), n_ones + N + n_zeros
    x, dt = torch.randn(2, L, h, p), torch.randn(2, L, h) * 0.5
    A, D, bias = -torch.exp(torch.randn(h)), torch.randn(h), torch.randn(h) * 0.3
    B, C = torch.randn(2, L, g, n_total), torch.randn(2, L, g, n_total)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, D, bias)]
    kw = dict(D=D, dt_bias=bias, dt_softplus=True, n_ones=n_ones, n_zeros=n_zeros)
    fn = SSDS[ssd]
    packed = fn(x, dt, A, B, C, seq_idx=seq_idx_for(lengths, FIRST[row], 2), **kw)
    separate = by_document(lambda x, dt, B, C: fn(x, dt, A, B, C, **kw), lengths, (x, dt, B, C), 1)
    assert_same_outputs_and_grads(packed, separate, leaves, ["x", "dt", "A", "B", "C", "D", "dt_bias"])


def test_ssd_initial_state_with_resets_matches_the_oracle():
    lengths, (h, p, g, N) = [2, 6, 3], (2, 2, 1, 3)
    L, n_total = sum(lengths), N + 2
    x, dt = torch.randn(2, L, h, p), torch.randn(2, L, h) * 0.5
    A, B, C = -torch.exp(torch.randn(h)), torch.randn(2, L, g, n_total), torch.randn(2, L, g, n_total)
    h0 = torch.randn(2, h, p, n_total)
    leaves = [t.requires_grad_() for t in (x, dt, A, B, C, h0)]
    kw = dict(n_ones=1, n_zeros=1, initial_state=h0, return_final_state=True, seq_idx=seq_idx_for(lengths, batch=2))
    out = [torch.cat([y.flatten(), s.flatten()]) for y, s in (ssd_ref.ssd_chunked(x, dt, A, B, C, chunk_size=4, **kw),
                                                               ssd_ref.ssd_sequential(x, dt, A, B, C, **kw))]
    assert_same_outputs_and_grads(*out, leaves, ["x", "dt", "A", "B", "C", "h0"])


MODELS = {
    "mamba": dict(arch="mamba", d_model=16, n_layer=2, vocab_size=40, ssm={"d_state": 4}),
    "mamba polarized": dict(arch="mamba", d_model=16, n_layer=2, vocab_size=40, ssm={"d_state": 4},
                            polarize={"ones": 1, "zeros": 1}),
    "mamba polarized reference": dict(arch="mamba", d_model=16, n_layer=2, vocab_size=40, ssm={"d_state": 4},
                                      polarize={"ones": 1, "zeros": 1, "zero_mode": "reference"}),
    "mamba2 polarized": dict(arch="mamba2", d_model=16, n_layer=2, vocab_size=40,
                             ssm={"d_state": 4, "head_dim": 8, "chunk_size": 4}, polarize={"ones": 1, "zeros": 1}),
    "mamba2": dict(arch="mamba2", d_model=16, n_layer=2, vocab_size=40, ssm={"d_state": 4, "head_dim": 8,
                                                                             "chunk_size": 4}),
    "transformer": dict(arch="transformer", d_model=16, n_layer=2, n_head=2, vocab_size=40),
}


@pytest.mark.parametrize("name,backend", [*((name, "torch") for name in MODELS),
                                          pytest.param("mamba polarized", "triton", marks=pytest.mark.slow),
                                          pytest.param("mamba2 polarized", "triton", marks=pytest.mark.slow)])
def test_model_with_resets_is_each_document_alone(name, backend, monkeypatch):
    """Logits of a packed window with ``seq_idx`` equal each document's logits run alone, and so do the
    gradients of every parameter (all layers, conv windows included); on the PyTorch kernels, and on the Triton
    scan and conv (the interpreter; the kernel tests cover every channel mode)."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("POLAR_KERNELS", backend)
    model = build_model(ModelConfig.from_dict(MODELS[name]))
    lengths = [3, 1, 6, 4]
    ids = torch.randint(0, 40, (2, sum(lengths)))
    params = [p for p in model.parameters() if p.requires_grad]
    packed = model(ids, seq_idx=seq_idx_for(lengths, batch=2)).logits
    separate = by_document(lambda ids: model(ids).logits, lengths, (ids,), 1)
    assert_same_outputs_and_grads(packed, separate, params, [n for n, p in model.named_parameters()], tol=2e-5)


def test_window_of_one_document_is_carry(monkeypatch):
    """A window that is one document (seq_idx constant) runs exactly what carry runs."""
    monkeypatch.setenv("POLAR_KERNELS", "torch")
    model = build_model(ModelConfig.from_dict(MODELS["mamba polarized"]))
    ids = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(model(ids, seq_idx=torch.full((2, 9), 3)).logits, model(ids).logits,
                               rtol=1e-6, atol=1e-6)


def test_resets_never_reach_mamba_ssm_selective_scan(monkeypatch, caplog):
    """With mamba_ssm's Mamba-1 scan importable (and preferred), a reset run goes to the next backend, says so
    once in the log, and never calls the stock kernel; a carry run still calls it."""
    calls = []

    class StockScan:
        @staticmethod
        def selective_scan_fn(u, delta, A, B, C, **kw):
            calls.append(1)
            return scan_ref._chunked_core(u, delta, A, B, C, None, None, chunk_size=4)

    real = dispatch.unavailable_reason
    monkeypatch.setattr(dispatch, "unavailable_reason",
                        lambda backend, device, op=None: None if backend == "cuda" else real(backend, device, op))
    monkeypatch.setattr(dispatch, "_probe", lambda module: (StockScan, None))
    monkeypatch.setattr(dispatch, "_announced", set())
    monkeypatch.delenv("POLAR_KERNELS", raising=False)
    u, delta, A, B, C, D, z, bias = scan_inputs(1, 3, 8, 2, 2)
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True)
    seq_idx = seq_idx_for([3, 5])
    with caplog.at_level(logging.WARNING, logger="kernels.dispatch"):
        y = dispatch.selective_scan(u, delta, A, B, C, seq_idx=seq_idx, **kw)
        dispatch.selective_scan(u, delta, A, B, C, seq_idx=seq_idx, **kw)
    assert calls == []
    torch.testing.assert_close(y, scan_ref.selective_scan_sequential(u, delta, A, B, C, seq_idx=seq_idx, **kw))
    warnings = [r.getMessage() for r in caplog.records if "cannot reset" in r.getMessage()]
    assert len(warnings) == 1 and "cuda" in warnings[0] and "torch" in warnings[0], warnings
    dispatch.selective_scan(u, delta, A, B, C, **kw)
    assert calls == [1]


def test_segmented_cumsum_matches_a_loop(np_rng):
    lengths = [int(n) for n in np_rng.integers(1, 6, size=5)]
    seq_idx = seq_idx_for(lengths, batch=2)
    x = torch.randn(2, 3, sum(lengths))
    want, total = torch.empty_like(x), torch.zeros(2, 3)
    r = documents.resets(seq_idx)
    for t in range(x.shape[-1]):
        total = torch.where(r[:, t, None], 0.0, total) + x[..., t]
        want[..., t] = total
    torch.testing.assert_close(documents.segmented_cumsum(x, seq_idx), want)



@pytest.fixture(scope="module")
def short_docs(tmp_path_factory, data) -> dict[str, str]:
    """The session's 512-piece tokenizer over 400 short random documents: several boundaries per window."""
    import random

    base = tmp_path_factory.mktemp("short-docs")
    src = write_jsonl(base / "docs.jsonl", random_docs(random.Random(0), 400, max_words=25))
    assert main(["prepare", "--dataset", str(src), "--tokenizer", data["tokenizer"], "--out", str(base / "data"),
                 "--val-fraction", "0.1"]) == 0
    return {"tokenizer": data["tokenizer"], "path": str(base / "data")}


def test_loader_marks_a_new_document_after_every_eos(short_docs):
    """The reset loader's seq_idx steps exactly after each EOS of the input (read from the tokens, not the index),
    and its tokens are the carry loader's, batch for batch."""
    tokens = TokenShards(short_docs["path"], "train")
    eos = tokens.manifest["eos_id"]
    ds = PackedDataset(tokens, 48)
    carry, reset = (DistributedSampleLoader(ds, 4, seed=3, document_boundaries=mode) for mode in ("carry", "reset"))
    starts = 0
    for _ in range(6):
        (x, y), (x2, y2, seq_idx) = next(carry), next(reset)
        assert torch.equal(x, x2) and torch.equal(y, y2) and seq_idx.dtype == torch.int32
        steps = seq_idx[:, 1:] != seq_idx[:, :-1]
        assert torch.equal(steps, x[:, :-1] == eos) and (seq_idx[:, 0] == 0).all()
        starts += int(steps.sum())
    assert starts > 8  # the check above compared real boundaries


@pytest.mark.slow
@pytest.mark.distributed
def test_reset_training_resumes_bitwise_and_differs_from_carry(tmp_path, short_docs):
    """2 processes x grad accumulation 2 under ZeRO-2: a reset run stopped by SIGTERM and resumed has the losses of
    the uninterrupted one, bit for bit (seq_idx travels with each micro-batch and follows from the sample);
    carry on the same data and initial weights has another loss from the first step on."""
    common = dict(data={"document_boundaries": "reset"}, eval={"every": 4})
    full = write_config(tmp_path, short_docs, name="full", **common)
    split = write_config(tmp_path, short_docs, name="split", **common)
    carry = write_config(tmp_path, short_docs, name="carry")
    ok(train(full, 2))
    preempted(train(split, 2, env=fault_env(signal_at_step=3)), 2)
    assert "resumed from" in ok(train(split, 2)).stdout
    expected = losses(tmp_path / "runs" / "full")
    assert len(expected) == 8 and losses(tmp_path / "runs" / "split") == expected
    ok(train(carry, 2))
    assert losses(tmp_path / "runs" / "carry")[0] != expected[0]


def test_stock_ssd_and_conv_receive_seq_idx(monkeypatch):
    """Where the stock CUDA kernels take ``seq_idx`` themselves (mamba_ssm's SSD, causal-conv1d), dispatch hands it
    to them as int32, with x channel-contiguous for causal-conv1d (its requirement for seq_idx)."""
    seen = {}

    class Stock:
        @staticmethod
        def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, initial_states=None, seq_idx=None,
                                      return_final_states=False):
            seen["ssd"] = seq_idx
            return ssd_ref.chunked_core(x, dt, A, B, C, initial_states, seq_idx.long(), chunk_size)

        @staticmethod
        def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, activation=None):
            seen["conv"] = (seq_idx, x.stride(1))
            return conv_ref.causal_conv1d(x, weight, bias, activation, seq_idx.long())

    real = dispatch.unavailable_reason
    monkeypatch.setattr(dispatch, "unavailable_reason",
                        lambda backend, device, op=None: None if backend == "cuda" else real(backend, device, op))
    monkeypatch.setattr(dispatch, "_probe", lambda module: (Stock, None))
    monkeypatch.delenv("POLAR_KERNELS", raising=False)
    lengths = [2, 5, 3]
    seq_idx = seq_idx_for(lengths, batch=2)
    x, w = torch.randn(2, 4, 10), torch.randn(4, 4)
    y = dispatch.causal_conv1d(x, w, None, seq_idx=seq_idx)
    assert seen["conv"][0].dtype == torch.int32 and seen["conv"][1] == 1
    torch.testing.assert_close(y, conv_ref.causal_conv1d(x, w, None, seq_idx=seq_idx))
    xs, dt, A = torch.randn(2, 10, 2, 3), torch.randn(2, 10, 2), -torch.rand(2) - 0.5
    B, C = torch.randn(2, 10, 1, 5), torch.randn(2, 10, 1, 5)
    kw = dict(dt_softplus=True, n_ones=1, n_zeros=1, seq_idx=seq_idx)
    y = dispatch.ssd(xs, dt, A, B, C, chunk_size=4, **kw)
    assert seen["ssd"].dtype == torch.int32
    torch.testing.assert_close(y, ssd_ref.ssd_sequential(xs, dt, A, B, C, **kw), rtol=1e-5, atol=1e-5)
