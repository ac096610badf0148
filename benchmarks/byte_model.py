"""Bytes a Triton launch moves, counted from its own tensor arguments, and the ideal bytes of the scan.

A launch recorded by :func:`kernels.triton_jit.capture` names every tensor the kernel touches, with its real
shape and dtype: the states a training forward saves (one per 256 steps), the fp32 dB/dC buffers and the
recomputed chunk-start states of the backward, one loss chunk's logits. The model counts each tensor argument
once (its distinct elements × element size): read, written, or both for in-place updates and atomic adds
(:data:`WRITES` says which). It is what the kernel moves when every tile is loaded once and caches absorb
re-reads (B and C, for instance, are loaded by every channel block; they are small enough to stay in L2), so it
sits between the ideal (each input of the op read once, each output written once) and what HBM really serves.
benchmarks/compile_kernels.py prints it per kernel beside registers and spills; benchmarks/gpu_check.py divides
measured times by it.
"""

from __future__ import annotations

import inspect

import torch

# Pointer arguments each kernel writes ("+": also read: in place, or fp32 atomic adds); every other tensor
# argument is read. A kernel launched without an entry raises, so a new kernel cannot be counted as all reads.
WRITES = {
    "scan_seg_kernel": ("H_ptr", "sdt_ptr", "keep_ptr"),
    "scan_fwd_kernel": ("y_ptr", "state_ptr", "hseg_ptr"),
    "scan_adj_kernel": ("Q_ptr", "sdt_ptr", "keep_ptr"),
    "scan_bwd_kernel": ("gu_ptr", "gdt_ptr", "gz_ptr", "+gA_ptr", "+gB_ptr", "+gC_ptr", "+gD_ptr", "+gbias_ptr",
                        "gstate_ptr", "+hbuf_ptr"),
    "conv_fwd_kernel": ("y_ptr",),
    "conv_bwd_kernel": ("gx_ptr", "gw_ptr", "gb_ptr"),
    "add_rmsnorm_fwd_kernel": ("out_ptr", "res_ptr", "rstd_ptr"),
    "add_rmsnorm_bwd_kernel": ("gx_ptr", "gr_ptr", "gw_ptr"),
    "ce_fwd_kernel": ("loss_ptr", "lse_ptr"),
    "ce_bwd_kernel": ("+logits_ptr",),  # dlogits overwrite the logits
}


def kernel_name(kernel) -> str:
    """The table's name of a :class:`kernels.triton_jit.LazyKernel` (``_scan_fwd_kernel`` -> ``scan_fwd_kernel``)."""
    return kernel.fn.__name__.strip("_")


def tensor_bytes(t: torch.Tensor) -> int:
    """Distinct elements × element size (a broadcast dimension, stride 0, holds one element)."""
    elements = 1
    for size, stride in zip(t.shape, t.stride()):
        elements *= size if stride else 1
    return elements * t.element_size()


def launch_bytes(kernel, args, kwargs) -> dict:
    """{"read": bytes, "written": bytes} of one captured launch ``(kernel, grid, args, kwargs)``."""
    name = kernel_name(kernel)
    if name not in WRITES:
        raise KeyError(f"byte_model.WRITES has no entry for {name}: list the pointer arguments it writes")
    params = list(inspect.signature(kernel.fn).parameters)
    bound = {**dict(zip(params, args)), **{k: v for k, v in kwargs.items() if k in params}}  # minus num_warps etc.
    writes = {w.lstrip("+"): w.startswith("+") for w in WRITES[name]}
    read = written = 0
    for arg, value in bound.items():
        if not isinstance(value, torch.Tensor):
            continue
        n = tensor_bytes(value)
        if arg in writes:
            written += n
            read += n if writes[arg] else 0
        else:
            read += n
    return dict(read=read, written=written)


def total_bytes(launches) -> int:
    """Read + written bytes of every captured launch."""
    return sum(sum(launch_bytes(k, a, kw).values()) for k, _, a, kw in launches)


def scan_ideal_bytes(b: int, d: int, L: int, n_total: int, element_size: int) -> tuple[int, int]:
    """(forward, backward) bytes of an ideal selective scan: forward reads u, Δ, z, B, C and writes y; backward
    reads u, Δ, z, B, C, dy and writes du, dΔ, dz, dB, dC (parameters and states are negligible or not needed)."""
    return (4 * b * d * L + 2 * b * n_total * L) * element_size, (7 * b * d * L + 4 * b * n_total * L) * element_size
