"""Triton selective scan (interpreter on CPU, compiled on CUDA) and the mamba_ssm composition vs the torch reference.

Kernels decide interpreter vs compiler at launch (kernels/triton_jit.py), so the ``device`` fixture just sets
TRITON_INTERPRET=1 for the CPU case per test; the rest of the suite in the same process never sees it.
"""

import pytest
import torch

pytest.importorskip("triton")

from kernels import scan_cuda, scan_ref, scan_triton  # noqa: E402

# Every forward test runs both forwards: the shipped loop of 2-D pair scans and the one-3-D-tile variant
# (scan_triton.tile_choice; the backward is the same for both, fed the states the forward saved)
TILES = pytest.mark.parametrize("tile", scan_triton.TILES)


def make_inputs(b, d, L, N, n_ones, n_zeros, dtype, device, extras=True, layout="model"):
    """Fresh random leaves: u, Δ, A_log, B, C, D, z, Δ-bias (A = -exp(A_log), so A_log's grad is checked).

    ``layout="model"``: the strides the Mamba mixer hands the scan: u, Δ channel-contiguous (b, L, d) buffers
    seen as (b, d, L); z the second half of in_proj's (b, L, 2d) output; B and C two slices of x_proj's
    (b, L, dt_rank + 2 N_total) output. ``"contiguous"``: plain (b, d, L) / (b, N, L) tensors.
    """
    nt = n_ones + N + n_zeros
    cdt = torch.promote_types(dtype, torch.float32)
    par = lambda t: t.to(device, cdt).requires_grad_()
    if layout == "model":
        act = lambda *s: torch.randn(s[0], s[2], s[1], device=device).to(dtype).transpose(1, 2).requires_grad_()
        u, delta = act(b, d, L), act(b, d, L)
        xz = torch.randn(b, L, 2 * d, device=device).to(dtype).requires_grad_()
        z = xz[..., d:].transpose(1, 2)
        proj = torch.randn(b, L, 3 + 2 * nt, device=device).to(dtype).requires_grad_()
        B, C = proj[..., 3 : 3 + nt].transpose(1, 2), proj[..., 3 + nt :].transpose(1, 2)
    else:
        act = lambda *s: torch.randn(*s, device=device).to(dtype).requires_grad_()
        u, delta, z, B, C = act(b, d, L), act(b, d, L), act(b, d, L), act(b, nt, L), act(b, nt, L)
    A_log = par(torch.randn(d, N) * 0.5)
    if not extras:
        return [u, delta, A_log, B, C, None, None, None]
    return [u, delta, A_log, B, C, par(torch.randn(d)), z, par(torch.randn(d) * 0.3)]


def scan_outputs_and_grads(fn, inputs, gy, gh, **kw):
    """Outputs and the grads of every input (inputs past the eighth, e.g. an initial state, ride in ``kw``)."""
    u, delta, A_log, B, C, D, z, bias = inputs[:8]
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


CASES = {  # (n_ones, n_zeros, zero_mode, dtype, L, chunk, layout, chunks per saved state): L not a multiple of the
    # chunk, d=5 vs block 4, the saved states' segments of one chunk, several chunks and the whole sequence
    "baseline": (0, 0, "exact", torch.float32, 13, 4, "model", 1),
    "polar-exact": (1, 1, "exact", torch.float32, 13, 4, "model", 3),
    "polar-reference": (1, 2, "reference", torch.float32, 11, 8, "model", None),
    "two-ones-contiguous": (2, 0, "exact", torch.float32, 9, 16, "contiguous", None),
    "polar-exact-bf16": (1, 1, "exact", torch.bfloat16, 10, 4, "model", 2),
    "polar-reference-bf16": (1, 1, "reference", torch.bfloat16, 7, 4, "contiguous", 1),
}


@TILES
@pytest.mark.parametrize("case", CASES)
def test_triton_scan_matches_reference(device, case, tile):
    n_ones, n_zeros, zero_mode, dtype, L, chunk, layout, seg = CASES[case]
    inputs = make_inputs(2, 5, L, 3, n_ones, n_zeros, dtype, device, layout=layout)
    kw = dict(n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode)
    gy = torch.randn(2, 5, L, device=device)
    gh = torch.randn(2, 5, n_ones + 3 + n_zeros, device=device)
    want = scan_outputs_and_grads(scan_ref.selective_scan_chunked, inputs, gy, gh, **kw)
    got = scan_outputs_and_grads(scan_triton.selective_scan, inputs, gy, gh, chunk_size=chunk, block_d=4,
                                 seg_chunks=seg, pieces=1, tile=tile, **kw)  # L splits: the test below
    assert_all_close(got, want, dtype)
    if layout == "model":  # y keeps the model's channel-contiguous layout (out_proj reads it without a copy)
        assert got[0].stride(1) == 1


@TILES
@pytest.mark.parametrize("b,seg_chunks,pieces", [(1, 2, None), (2, 3, 1), (1, 1, 2)])
def test_triton_scan_recomputes_unsaved_states_from_a_carried_state(device, b, seg_chunks, pieces, tile):
    """The training forward keeps one state per ``seg_chunks`` chunks and no pre-gate output; the backward
    recomputes the chunk starts between saved states (a sweep per segment) and the pre-gate y for dz; forward and
    backward run L as ``pieces`` programs (None: split_pieces, here one per segment; 1: one program walks every
    segment; 2: two segments per piece), each folding the earlier segments' end states (forward) or the later
    segments' adjoints (backward) into its start. Against the
    reference (chunked scan plus the initial-state closed form), with an initial state, batch 1 and 2, L = 18
    (five 4-step chunks, the last one half full, the last segment partial): outputs and every gradient, h0's too.
    Catches a chunk start read from the wrong segment or slot, a sweep that skips or repeats a chunk, a wrong
    partial last segment, a pre-gate y rebuilt without a channel kind (dz), and a piece that starts from the wrong
    state or adjoint (h0, dL/dh_L or a segment left out or folded twice, a missing decay)."""
    from kernels import dispatch

    L, nt = 18, 1 + 3 + 1
    inputs = make_inputs(b, 5, L, 3, 1, 1, torch.float32, device)
    h0 = torch.randn(b, 5, nt, device=device, requires_grad=True)
    gy, gh = torch.randn(b, 5, L, device=device), torch.randn(b, 5, nt, device=device)
    kw = dict(n_ones=1, n_zeros=1, initial_state=h0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLAR_KERNELS", "torch")
        want = scan_outputs_and_grads(dispatch.selective_scan, [*inputs, h0], gy, gh, **kw)
    got = scan_outputs_and_grads(scan_triton.selective_scan, [*inputs, h0], gy, gh, chunk_size=4, block_d=4,
                                 seg_chunks=seg_chunks, pieces=pieces, tile=tile, **kw)
    assert_all_close(got, want, torch.float32, names=[*NAMES, "initial_state"])


@TILES
@pytest.mark.parametrize("zero_mode,n_ones,n_zeros", [("exact", 1, 1), ("reference", 0, 1)])
def test_triton_scan_continues_from_initial_state(device, zero_mode, n_ones, n_zeros, tile, monkeypatch):
    """dispatch.selective_scan(initial_state=h0) on the Triton backend (h0 enters the kernel) vs the torch
    backend (closed-form correction), gradients of h0 included; and continuing equals one long scan. The tile
    reaches the model's path (dispatch) through POLAR_SCAN_TILE."""
    monkeypatch.setenv("POLAR_SCAN_TILE", tile)
    from kernels import dispatch

    L, nt = 11, n_ones + 3 + n_zeros
    inputs = make_inputs(2, 5, L, 3, n_ones, n_zeros, torch.float32, device)
    h0 = torch.randn(2, 5, nt, device=device, requires_grad=True)
    gy, gh = torch.randn(2, 5, L, device=device), torch.randn(2, 5, nt, device=device)
    kw = dict(n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode, initial_state=h0)

    def run(backend):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("POLAR_KERNELS", backend)
            return scan_outputs_and_grads(dispatch.selective_scan, [*inputs, h0], gy, gh, **kw)

    assert_all_close(run("triton"), run("torch"), torch.float32, names=[*NAMES, "initial_state"])
    u, delta, A_log, B, C, D, z, bias = (t.detach() if t is not None else None for t in inputs)
    args = lambda s: (u[..., s], delta[..., s], -torch.exp(A_log), B[..., s], C[..., s], D, z[..., s], bias, True)
    kw = dict(n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode, return_last_state=True, chunk_size=4, block_d=4,
              tile=tile)
    y_all, h_all = scan_triton.selective_scan(*args(slice(None)), **kw)
    y1, h1 = scan_triton.selective_scan(*args(slice(0, 6)), **kw)
    y2, h2 = scan_triton.selective_scan(*args(slice(6, None)), initial_state=h1, **kw)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y_all, **TOL[torch.float32])
    torch.testing.assert_close(h2, h_all, **TOL[torch.float32])


@TILES
def test_triton_scan_without_optional_inputs(device, tile):
    """No D, z, Δ-bias or softplus; the final state unused (its gradient is None)."""
    inputs = make_inputs(1, 3, 6, 2, 1, 1, torch.float32, device, extras=False)
    gy = torch.randn(1, 3, 6, device=device)
    want = scan_outputs_and_grads(scan_ref.selective_scan_chunked, inputs, gy, None, n_ones=1, n_zeros=1)
    got = scan_outputs_and_grads(scan_triton.selective_scan, inputs, gy, None, n_ones=1, n_zeros=1, chunk_size=4,
                                 tile=tile)
    assert_all_close(got, want, torch.float32, names=NAMES[:7])


@TILES
def test_triton_scan_inference_saves_nothing(device, tile):
    """Under no_grad the forward keeps no states and, at batch 1, splits L into one piece per segment (a 4-step
    chunk here): same y. Catches an inference forward that needs the training forward's saved states."""
    inputs = [t.detach() if t is not None else None for t in make_inputs(1, 3, 7, 2, 1, 1, torch.float32, device)]
    u, delta, A_log, B, C, D, z, bias = inputs
    with torch.no_grad():
        got = scan_triton.selective_scan(u, delta, -torch.exp(A_log), B, C, D, z, bias, True, 1, 1, chunk_size=4,
                                         seg_chunks=1, tile=tile)
    want = scan_ref.selective_scan_chunked(u, delta, -torch.exp(A_log), B, C, D, z, bias, True, 1, 1)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scan_model_sized(dtype):
    """Compiled kernel at a training-like size (several chunks and channel blocks) against the reference."""
    inputs = make_inputs(2, 256, 300, 16, 1, 1, dtype, "cuda", layout="contiguous")
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
    inputs = make_inputs(2, 4, 9, 3, n_ones, n_zeros, torch.float64, "cpu", layout="contiguous")
    gy, gh = torch.randn(2, 4, 9, dtype=torch.float64), torch.randn(2, 4, n_ones + 3 + n_zeros, dtype=torch.float64)
    kw = dict(n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode)
    stock = scan_ref.selective_scan_sequential
    want = scan_outputs_and_grads(scan_ref.selective_scan_chunked, inputs, gy, gh, **kw)
    got = scan_outputs_and_grads(lambda *a, **k: scan_cuda.selective_scan(stock, *a, **k), inputs, gy, gh, **kw)
    for name, a, b in zip(NAMES, got, want, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


# Packed documents (seq_idx): L = 18 in 4-step chunks (five chunks, the last half full). Row 0: documents of
# 1, 1, 5, 1, 6, 3 and 1 steps (starts at 1, 2, 7, 8 = a chunk start, 14 and 17 = the last step; documents crossing
# the chunk starts 4 and 12, of length 1 at both ends and inside). Row 1: a window starting mid-document (seq_idx
# 5 at position 0), one start at 10, its documents crossing several chunks and saved-state segments.
DOC_LENGTHS = ([1, 1, 5, 1, 6, 3, 1], [10, 8])
DOC_FIRST = (0, 5)


def packed_seq_idx(rows, device):
    return torch.stack([torch.repeat_interleave(torch.arange(len(lens)) + DOC_FIRST[i], torch.tensor(lens))
                        for i, lens in rows]).to(device=device, dtype=torch.int32)


def separate_documents(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state=True,
                       initial_state=None, seq_idx=None, n_ones=0, n_zeros=0, zero_mode="exact"):
    """The torch reference run on every document of every row separately from a zero state (the first from
    ``initial_state``), y concatenated; the last state is the last document's."""
    kw = dict(n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode)
    ys, hs = [], []
    for i, q in enumerate(seq_idx.tolist()):
        starts = [0, *[t for t in range(1, len(q)) if q[t] != q[t - 1]], len(q)]
        row = []
        for k, (s, e) in enumerate(zip(starts, starts[1:], strict=False)):
            cut = lambda t, i=i, s=s, e=e: None if t is None else t[i : i + 1, :, s:e]
            y, h = scan_ref.selective_scan_chunked(cut(u), cut(delta), A, cut(B), cut(C), D, cut(z), delta_bias,
                                                   delta_softplus, return_last_state=True, **kw)
            if k == 0 and initial_state is not None:
                dy, dh = scan_ref.initial_state_terms(initial_state[i : i + 1], cut(delta), A, cut(C), cut(z),
                                                      delta_bias, delta_softplus, **kw)
                y, h = y + dy, h + dh
            row.append(y)
        ys.append(torch.cat(row, -1))
        hs.append(h)
    return torch.cat(ys).to(u.dtype), torch.cat(hs)


RESET_CASES = {  # (n_ones, n_zeros, zero_mode, batch rows, chunks per saved state, pieces, initial state)
    "baseline": (0, 0, "exact", (0, 1), 1, 1, False),
    "polar-exact": (1, 1, "exact", (0, 1), 2, 1, True),
    "polar-reference": (1, 1, "reference", (0, 1), 3, 1, True),
    "pieces-exact-b1": (1, 1, "exact", (0,), 1, None, True),  # one piece per segment
    "pieces-reference-b1": (1, 1, "reference", (0,), 1, 2, True),  # three segments, then two
    "pieces-baseline-mid-document-b1": (0, 0, "exact", (1,), 1, None, False),
}


@TILES
@pytest.mark.parametrize("case", RESET_CASES)
def test_triton_scan_resets_at_document_starts(device, case, tile):
    """A packed window with seq_idx equals every document run separately from a zero state and concatenated:
    y, the last state and every gradient (u, Δ, A, B, C, D, z, Δ-bias, the initial state, which reaches only the
    first document), training forward and backward (the chunk starts rebuilt from saved states across document
    starts, the adjoint stopped at them), batch 1 with L split into pieces (a segment holding a document start
    drops the state or adjoint folded in from the others), and the inference forward. Catches a reset one step
    off, a ones channel summing across a document start, a reset missing from the closed-form sums (segment
    rebuild, state passing) or from the carried adjoint, and a leak of h0 into later documents."""
    n_ones, n_zeros, zero_mode, rows, seg_chunks, pieces, with_h0 = RESET_CASES[case]
    b, L, nt = len(rows), 18, n_ones + 3 + n_zeros
    seq_idx = packed_seq_idx([(i, DOC_LENGTHS[i]) for i in rows], device)
    inputs = make_inputs(b, 5, L, 3, n_ones, n_zeros, torch.float32, device)
    extra = [torch.randn(b, 5, nt, device=device, requires_grad=True)] if with_h0 else []
    kw = dict(n_ones=n_ones, n_zeros=n_zeros, zero_mode=zero_mode, seq_idx=seq_idx,
              initial_state=extra[0] if with_h0 else None)
    gy, gh = torch.randn(b, 5, L, device=device), torch.randn(b, 5, nt, device=device)
    names = [*NAMES, "initial_state"]
    want = scan_outputs_and_grads(separate_documents, [*inputs, *extra], gy, gh, **kw)
    got = scan_outputs_and_grads(scan_triton.selective_scan, [*inputs, *extra], gy, gh, chunk_size=4, block_d=4,
                                 seg_chunks=seg_chunks, pieces=pieces, tile=tile, **kw)
    assert_all_close(got, want, torch.float32, names=names)
    u, delta, A_log, B, C, D, z, bias = (t.detach() for t in inputs)
    with torch.no_grad():  # the inference forward (no saved states), split the same way
        y, h = scan_triton.selective_scan(u, delta, -torch.exp(A_log), B, C, D, z, bias, True, return_last_state=True,
                                          chunk_size=4, block_d=4, seg_chunks=seg_chunks, pieces=pieces, tile=tile,
                                          **kw)
    assert_all_close([y, h], want[:2], torch.float32)


@TILES
def test_triton_scan_resets_at_random_document_starts(device, rng, tile):
    """Random document lengths (1 to 13 steps, drawn from the test's seed) and first indices over L = 29 in 4-step
    chunks, two chunks per saved state, batch 2 and batch 1 split into pieces, polarized with reference-mode zeros
    (a scan channel): same check as above."""
    zero_mode = "reference"
    L, nt = 29, 1 + 3 + 1

    def draw_row():
        lens = []
        while sum(lens) < L:
            lens.append(min(rng.choice([1, 1, 2, 3, 4, 5, 7, 9, 13]), L - sum(lens)))
        first = rng.randrange(0, 50)
        return [first + k for k, n in enumerate(lens) for _ in range(n)]

    for b, pieces in ((2, 1), (1, None)):
        seq_idx = torch.tensor([draw_row() for _ in range(b)], dtype=torch.int32, device=device)
        inputs = make_inputs(b, 5, L, 3, 1, 1, torch.float32, device)
        h0 = torch.randn(b, 5, nt, device=device, requires_grad=True)
        gy, gh = torch.randn(b, 5, L, device=device), torch.randn(b, 5, nt, device=device)
        kw = dict(n_ones=1, n_zeros=1, zero_mode=zero_mode, seq_idx=seq_idx, initial_state=h0)
        want = scan_outputs_and_grads(separate_documents, [*inputs, h0], gy, gh, **kw)
        got = scan_outputs_and_grads(scan_triton.selective_scan, [*inputs, h0], gy, gh, chunk_size=4, block_d=4,
                                     seg_chunks=2, pieces=pieces, tile=tile, **kw)
        assert_all_close(got, want, torch.float32, names=[*NAMES, "initial_state"])


def test_triton_scan_one_document_is_no_reset(device):
    """seq_idx with one document (any index) gives the results of no seq_idx, gradients included: the reset path
    adds nothing where no document starts (the ones channels' pair scan equals their cumulative sum)."""
    L, nt = 10, 1 + 3 + 1
    inputs = make_inputs(2, 5, L, 3, 1, 1, torch.float32, device)
    h0 = torch.randn(2, 5, nt, device=device, requires_grad=True)
    gy, gh = torch.randn(2, 5, L, device=device), torch.randn(2, 5, nt, device=device)
    kw = dict(n_ones=1, n_zeros=1, initial_state=h0, chunk_size=4, block_d=4, seg_chunks=1)
    want = scan_outputs_and_grads(scan_triton.selective_scan, [*inputs, h0], gy, gh, **kw)
    seq_idx = torch.full((2, L), 3, dtype=torch.int32, device=device)
    got = scan_outputs_and_grads(scan_triton.selective_scan, [*inputs, h0], gy, gh, seq_idx=seq_idx, **kw)
    assert_all_close(got, want, torch.float32, names=[*NAMES, "initial_state"])


def test_scan_tile_switch(monkeypatch):
    """The forward's tile: the argument, else POLAR_SCAN_TILE, else the shipped 2-D loop; anything else is refused."""
    monkeypatch.delenv("POLAR_SCAN_TILE", raising=False)
    assert scan_triton.tile_choice() == "2d" and scan_triton.tile_choice("3d") == "3d"
    monkeypatch.setenv("POLAR_SCAN_TILE", "3D")
    assert scan_triton.tile_choice() == "3d" and scan_triton.tile_choice("2d") == "2d"
    monkeypatch.setenv("POLAR_SCAN_TILE", "4d")
    with pytest.raises(ValueError, match="POLAR_SCAN_TILE"):
        scan_triton.tile_choice()
