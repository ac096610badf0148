"""The byte model (benchmarks/byte_model.py): every Triton kernel we ship is counted, by its real argument names,
and a scan launch counts exactly the tensors it reads and writes."""

import importlib
import inspect
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import byte_model  # noqa: E402

from kernels.triton_jit import LazyKernel, capture  # noqa: E402


def shipped_kernels() -> dict:
    kernels = {}
    for module in ("scan_triton", "conv_triton", "norm_triton", "loss_triton"):
        for value in vars(importlib.import_module(f"kernels.{module}")).values():
            if isinstance(value, LazyKernel):
                kernels[byte_model.kernel_name(value)] = value
    return kernels


def test_every_shipped_kernel_has_an_entry_naming_its_real_arguments():
    """Catches a new kernel counted as reading everything (no entry) and a renamed output pointer that would
    silently turn a write into a read."""
    kernels = shipped_kernels()
    assert set(kernels) == set(byte_model.WRITES)
    for name, kernel in kernels.items():
        params = set(inspect.signature(kernel.fn).parameters)
        assert {w.lstrip("+") for w in byte_model.WRITES[name]} <= params, name


def test_a_training_scan_launch_counts_each_tensor_once():
    """Catches a byte count that misses what the training forward saves (the fp32 state every SAVE_STEPS steps and
    the two carried-state slots) or counts an output as read, and a forward that saves more than that (a pre-gate
    y, a state per chunk): the launch's bytes equal the hand count of its tensors."""
    from kernels import scan_triton

    b, d, L, N, es = 2, 2112, 600, 16, 2  # 2 x 132 channel blocks fill two waves of SMs: L is not split
    nt, S = N + 2, N + 1  # 1 ones + 16 learned + 1 zeros; the carried state holds ones + learned
    with torch.device("meta"):
        u, delta, z = (torch.empty(b, L, d, dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for _ in range(3))
        B, C = (torch.empty(b, nt, L, dtype=torch.bfloat16) for _ in range(2))
        A, D, bias = torch.empty(d, N), torch.empty(d), torch.empty(d)
    with capture() as launches:
        scan_triton.selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, n_ones=1, n_zeros=1)
    (kernel, _, args, kwargs), = launches
    n_saved = -(-L // scan_triton.SAVE_STEPS)
    assert n_saved == 3 and scan_triton.SAVE_STEPS % kwargs["CHUNK"] == 0
    read = 3 * b * d * L * es + 2 * b * nt * L * es + (d * N + 2 * d) * 4
    written = b * d * L * es + (n_saved + 2) * b * S * d * 4  # y; fp32 states: saved ones and two carried slots
    assert byte_model.launch_bytes(kernel, args, kwargs) == dict(read=read, written=written)


def test_a_broadcast_dimension_holds_one_element():
    """Catches an expanded (stride-0) tensor counted at its logical size."""
    t = torch.empty(5, 1, dtype=torch.bfloat16).expand(5, 1000)
    assert byte_model.tensor_bytes(t) == 5 * 2


def test_a_split_scan_counts_its_state_passing_passes():
    """Catches an L-split forward or backward (batch 1) whose state-passing pass goes uncounted: the forward's
    reads u, Δ and B once more and writes each segment's end state and ΣΔ, which the forward reads back; the
    backward's reads Δ, dy, z and C once more and writes each segment's adjoint and ΣΔ."""
    from kernels import scan_triton

    b, d, L, N, es = 1, 64, 1000, 16, 2
    nt, S = N + 2, N + 1
    with torch.device("meta"):
        u, delta, z = (torch.empty(b, L, d, dtype=torch.bfloat16).transpose(1, 2).requires_grad_() for _ in range(3))
        B, C = (torch.empty(b, nt, L, dtype=torch.bfloat16) for _ in range(2))
        A, D, bias = torch.empty(d, N), torch.empty(d), torch.empty(d)
    with capture() as launches:
        y = scan_triton.selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True, n_ones=1, n_zeros=1)
    (seg, _, seg_args, seg_kwargs), (fwd, grid, fwd_args, fwd_kwargs) = launches
    with capture() as launches:
        y.backward(torch.empty_like(y))
    (adj, _, adj_args, adj_kwargs), (bwd, bwd_grid, _, _) = launches
    assert byte_model.kernel_name(adj) == "scan_adj_kernel" and bwd_grid[2] > 1
    n_segs = -(-L // scan_triton.SAVE_STEPS)
    assert byte_model.kernel_name(seg) == "scan_seg_kernel" and grid[2] > 1
    state_passing = b * n_segs * (S + 1) * d * 4  # H and ΣΔ per segment, fp32
    assert byte_model.launch_bytes(seg, seg_args, seg_kwargs) == dict(
        read=2 * b * d * L * es + b * nt * L * es + (d * N + d) * 4, written=state_passing)
    assert byte_model.launch_bytes(fwd, fwd_args, fwd_kwargs)["read"] == \
        3 * b * d * L * es + 2 * b * nt * L * es + (d * N + 2 * d) * 4 + state_passing
    assert byte_model.launch_bytes(adj, adj_args, adj_kwargs) == dict(
        read=3 * b * d * L * es + b * nt * L * es + (d * N + d) * 4, written=state_passing)
