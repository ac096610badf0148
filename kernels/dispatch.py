"""Kernel dispatch: picks the backend for each op on each call, so models never name a backend.

Order under ``auto``, per op: mamba_ssm / causal_conv1d CUDA kernels (importable and tensors on CUDA) ->
our Triton kernels (on CUDA) -> the PyTorch reference (CPU and fallback). Not every op has every backend
(:data:`OPS`); an op without the requested one uses the next slower one it has.

Document resets (``seq_idx``, :mod:`kernels.documents`) go to backends that implement them: mamba_ssm's
Mamba-1 selective scan cannot reset (its issue 180), so a scan with ``seq_idx`` skips it for the next backend
and says so once in the log; causal-conv1d and mamba_ssm's SSD take ``seq_idx`` themselves.

``POLAR_KERNELS=auto|cuda|triton|torch`` forces a backend; a forced backend that cannot run raises
:class:`KernelBackendError` naming why and the fix. ``POLAR_KERNELS=triton`` also runs on CPU tensors
when ``TRITON_INTERPRET=1`` (the Triton interpreter: how the kernels are tested without a GPU).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from kernels import conv_ref, loss_ref, norm_ref, scan_ref, ssd_ref
from kernels.triton_jit import capturing, interpreting

ENV_VAR = "POLAR_KERNELS"
CHOICES = ("auto", "torch", "triton", "cuda")
PREFERENCE = ("cuda", "triton", "torch")  # fastest first
OPS = {  # op -> backends that implement it, fastest first
    "selective_scan": ("cuda", "triton", "torch"),
    "selective_step": ("torch",),  # one token: a handful of elementwise ops, nothing to fuse
    "causal_conv1d": ("cuda", "triton", "torch"),
    "ssd": ("cuda", "torch"),  # Mamba-2; "cuda" is mamba_ssm's SSD (Triton) kernels. Decoding steps are PyTorch.
    "add_rmsnorm": ("triton", "torch"),
    "linear_cross_entropy": ("triton", "torch"),
}
NO_RESETS = {"selective_scan": ("cuda",)}  # op -> backends that cannot reset at document boundaries
CUDA_PACKAGES = {  # op -> module with the stock CUDA kernel
    "selective_scan": "mamba_ssm.ops.selective_scan_interface",
    "causal_conv1d": "causal_conv1d",
    "ssd": "mamba_ssm.ops.triton.ssd_combined",
}

log = logging.getLogger(__name__)
_announced: set[tuple[str, str]] = set()


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run here; the message names why and what to do."""


@functools.cache
def _probe(module: str):
    """(module, None) when importable, else (None, why). Cached: a failed compiled import is slow and noisy.

    Any exception counts as unavailable: ``import mamba_ssm`` raises ImportError, OSError or RuntimeError
    when its CUDA extension is missing or was built for another torch.
    """
    try:
        return importlib.import_module(module), None
    except Exception as e:  # any failure means unavailable, see the docstring
        return None, f"import {module} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise KernelBackendError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}: unset it or pick one")
    return value


def unavailable_reason(backend: str, device: torch.device, op: str | None = None) -> str | None:
    """Why ``backend`` can't run on ``device`` (for ``op``, when given); None when it can."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend == "triton":
        if device.type == "meta" and capturing():  # launches recorded for the offline compile check
            return _probe("triton")[1]
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            return f"the triton backend needs CUDA tensors, got {device.type} (or TRITON_INTERPRET=1 for CPU tensors)"
        return _probe("triton")[1]
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type}"
        packages = [CUDA_PACKAGES[op]] if op in CUDA_PACKAGES else list(CUDA_PACKAGES.values())
        missing = [why for why in (_probe(p)[1] for p in packages) if why]
        if missing:
            return "; ".join(missing) + " (pip install mamba-ssm causal-conv1d built for this torch and CUDA)"
        return None
    return f"unknown backend {backend!r}"


def choose_backend(device: torch.device | str = "cpu", op: str = "selective_scan", resets: bool = False) -> str:
    """The backend ``op`` on ``device`` will use, honouring ``POLAR_KERNELS``; with ``resets``, one that can reset
    at document boundaries."""
    device = torch.device(device)
    want = requested_backend()
    candidates = [b for b in OPS[op] if not (resets and b in NO_RESETS.get(op, ()))]
    if want == "auto":  # the Triton interpreter is for testing: only a forced choice runs it
        candidates = [b for b in candidates if b != "triton" or device.type == "cuda"]
    else:
        reason = unavailable_reason(want, device, op if want in candidates else None)
        if reason:
            raise KernelBackendError(f"{ENV_VAR}={want}: {reason}; set {ENV_VAR}=auto or torch")
        candidates = [b for b in candidates if PREFERENCE.index(b) >= PREFERENCE.index(want)]
    return next(b for b in candidates if unavailable_reason(b, device, op) is None)


def _announce(op: str, backend: str) -> None:
    if (op, backend) not in _announced:
        _announced.add((op, backend))
        log.info("kernel backend for %s: %s", op, backend)  # to the log file only (pretrain/console.py)


def _backend(op: str, device: torch.device, seq_idx: torch.Tensor | None = None) -> str:
    backend = choose_backend(device, op, resets=seq_idx is not None)
    if seq_idx is not None and (op, "resets") not in _announced:
        _announced.add((op, "resets"))
        if (usual := choose_backend(device, op)) != backend:
            log.warning("%s: the %s kernel cannot reset at document boundaries; document_boundaries: reset runs "
                        "it on %s", op, usual, backend)
    _announce(op, backend)
    return backend


def describe(device: torch.device | str = "cpu") -> dict[str, str]:
    """Backend per op plus why the faster ones are skipped (for ``polar info``); a flat str -> str dict."""
    device = torch.device(device)
    out = {"requested": requested_backend()}
    for op in OPS:
        try:
            out[op] = choose_backend(device, op)
        except KernelBackendError as e:
            out[op] = f"error: {e}"
    for b in PREFERENCE:
        reason = unavailable_reason(b, device)
        out[f"{b}_available"] = "yes" if reason is None else f"no ({reason})"
    return out


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact", return_last_state=False, initial_state=None, seq_idx=None,
):
    """Selective scan with polarized channels; signature and shapes of :mod:`kernels.scan_ref`, plus
    ``initial_state`` (b, d, N_total) to continue from (our kernels start from it; for mamba_ssm's it is added by
    linearity: :func:`scan_ref.initial_state_terms`) and ``seq_idx`` (b, L) to reset at document boundaries."""
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, n_ones, n_zeros, zero_mode)
    backend = _backend("selective_scan", u.device, seq_idx)
    if backend == "triton":
        from kernels import scan_triton

        return scan_triton.selective_scan(*args, return_last_state, initial_state, seq_idx=seq_idx)
    if backend == "torch":
        return scan_ref.selective_scan_chunked(*args, return_last_state, seq_idx, initial_state=initial_state)
    from kernels import scan_cuda

    stock = _probe(CUDA_PACKAGES["selective_scan"])[0].selective_scan_fn
    out = scan_cuda.selective_scan(stock, *args, return_last_state)
    if initial_state is None:
        return out
    y, h = out if return_last_state else (out, None)
    dy, dh = scan_ref.initial_state_terms(initial_state, delta, A, C, z, delta_bias, delta_softplus,
                                          n_ones, n_zeros, zero_mode)
    y = (y + dy).to(u.dtype)
    return (y, h + dh) if return_last_state else y


def selective_step(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact",
):
    """One decoding step; returns (y, new_state). See :func:`kernels.scan_ref.selective_step`."""
    _backend("selective_step", x.device)
    return scan_ref.selective_step(
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, n_ones, n_zeros, zero_mode
    )


def ssd(x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, n_ones=0, n_zeros=0,
        initial_state=None, return_final_state=False, chunk_size=256, seq_idx=None):
    """Mamba-2's SSD scan with polarized channels; signature and shapes of :func:`kernels.ssd_ref.ssd_chunked`.
    mamba_ssm's ``mamba_chunk_scan_combined`` (CUDA) or our chunked PyTorch form runs the learned channels,
    :func:`ssd_ref.polarized_ssd` adds the polar ones."""
    if _backend("ssd", x.device, seq_idx) == "cuda":
        stock = _probe(CUDA_PACKAGES["ssd"])[0].mamba_chunk_scan_combined

        def core(x, dt, A, B, C, h0, seq_idx):
            seq = None if seq_idx is None else seq_idx.to(torch.int32).contiguous()
            return stock(x, dt, A, B, C, chunk_size, initial_states=h0, seq_idx=seq, return_final_states=True)
    else:
        core = functools.partial(ssd_ref.chunked_core, chunk_size=chunk_size)
    return ssd_ref.polarized_ssd(core, x, dt, A, B, C, D, dt_bias, dt_softplus, n_ones, n_zeros, initial_state,
                                 return_final_state, seq_idx)


def ssd_step(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=False, n_ones=0, n_zeros=0):
    """One Mamba-2 decoding step (always PyTorch: one token has nothing to fuse); see :func:`ssd_ref.ssd_step`."""
    return ssd_ref.ssd_step(state, x, dt, A, B, C, D, dt_bias, dt_softplus, n_ones, n_zeros)


def causal_conv1d(x, weight, bias=None, activation="silu", seq_idx=None):
    """Causal depthwise conv1d + activation ("silu" or None): x (b, d, L), weight (d, k), bias (d,); with
    ``seq_idx`` (b, L) no tap crosses a document boundary."""
    backend = _backend("causal_conv1d", x.device, seq_idx)
    if backend == "cuda":
        fn = _probe(CUDA_PACKAGES["causal_conv1d"])[0].causal_conv1d_fn
        if seq_idx is None:
            return fn(x, weight, bias, activation=activation)
        if x.stride(1) != 1:  # causal-conv1d takes seq_idx only with channels contiguous
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return fn(x, weight, bias, seq_idx=seq_idx.to(torch.int32).contiguous(), activation=activation)
    if backend == "triton":
        from kernels import conv_triton

        return conv_triton.causal_conv1d(x, weight, bias, activation, seq_idx=seq_idx)
    return conv_ref.causal_conv1d(x, weight, bias, activation, seq_idx)


def add_rmsnorm(x, residual, weight, eps):
    """(x + residual) -> (RMSNorm of it (weight · cast), the sum in fp32); residual may be None."""
    if _backend("add_rmsnorm", x.device) == "triton":
        from kernels import norm_triton

        return norm_triton.add_rmsnorm(x, residual, weight, eps)
    return norm_ref.add_rmsnorm(x, residual, weight, eps)


def linear_cross_entropy(hidden, weight, labels, ignore_index=loss_ref.IGNORE_INDEX, chunk_size=1024):
    """Mean cross-entropy of ``hidden (T, d) @ weight (V, d)^T`` against labels (T,), chunked over tokens.

    Under autocast the matmuls run in the autocast dtype, as an ``nn.Linear`` head would.
    """
    device_type = hidden.device.type
    if device_type != "meta" and torch.is_autocast_enabled(device_type):  # meta: the offline compile check
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if _backend("linear_cross_entropy", hidden.device) == "triton":
        from kernels import loss_triton

        return loss_triton.linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size)
    return loss_ref.linear_cross_entropy(hidden, weight, labels, ignore_index, chunk_size)
