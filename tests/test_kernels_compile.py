"""Offline GPU build check: every Triton kernel a mamba-130m training step launches (baseline and polarized,
bf16 and fp32, the model's real strides and the shipped block sizes) compiles for sm_90 without spilling.

No GPU needed: Triton compiles for GPUTarget("cuda", 90, 32) here and its bundled cuobjdump reads the cubin
(benchmarks/compile_kernels.py, which `make bench` runs for every preset).
"""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compile_kernels.py"


def load_script():
    spec = importlib.util.spec_from_file_location("compile_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_without_spills(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    compile_kernels = load_script()
    rows = compile_kernels.check(presets=("mamba-130m",), batch=2, seq=2048)
    kernels = {r["kernel"] for r in rows}
    assert {"scan_fwd_kernel", "scan_bwd_kernel", "conv_fwd_kernel", "conv_bwd_kernel", "add_rmsnorm_fwd_kernel",
            "add_rmsnorm_bwd_kernel", "ce_fwd_kernel", "ce_bwd_kernel"} <= kernels
    assert {(r["dtype"], r["polar"]) for r in rows} == {(d, p) for d in ("bf16", "fp32") for p in (False, True)}
    assert compile_kernels.failures(rows) == []
    assert all(0 < r["registers"] <= 255 for r in rows)


def test_a_spilling_kernel_is_reported(monkeypatch):
    """The check can fail: a kernel whose tile cannot fit in registers shows spill bytes and a failure line."""
    import triton.language as tl

    from kernels.triton_jit import capture, jit

    @jit
    def _huge_tile_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):  # 512 elements per thread, all live
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
        e = tl.exp(x)
        y = x * tl.sum(e, axis=0)[None, :] + tl.sum(e, axis=1)[:, None]
        tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], y)

    import torch

    x = torch.empty(128, 128, device="meta")
    with capture() as launches:
        _huge_tile_kernel[(1,)](x, x, BLOCK=128, num_warps=1)
    (kernel, _, args, kwargs), = launches
    compile_kernels = load_script()
    usage = compile_kernels.resource_usage(compile_kernels.compile_launch(kernel, args, kwargs))
    assert usage["spill_bytes"] > 0
    row = dict(preset="p", dtype="fp32", polar=False, kernel="huge", ok=True, settings="BLOCK=128", **usage)
    assert compile_kernels.failures([row]) == [f"p fp32 base huge: {usage['spill_bytes']} bytes of spills at BLOCK=128"]
