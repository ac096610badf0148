"""Kernel dispatch: picks the backend for each op on each call, so models never name a backend.

Order under ``auto``: mamba_ssm/causal_conv1d CUDA kernels (importable and tensors on CUDA) -> our
Triton kernels (on CUDA) -> the PyTorch reference (CPU and fallback). ``POLAR_KERNELS`` forces one
of ``torch | triton | cuda``; a forced backend that cannot run raises :class:`KernelBackendError`.
Only the ``torch`` backend exists so far; the others report themselves unavailable with the reason.
"""

from __future__ import annotations

import logging
import os

import torch

from kernels import scan_ref

ENV_VAR = "POLAR_KERNELS"
CHOICES = ("auto", "torch", "triton", "cuda")
PREFERENCE = ("cuda", "triton", "torch")  # fastest first

log = logging.getLogger(__name__)
_announced: set[tuple[str, str]] = set()


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run here; the message names why and what to do."""


def requested_backend() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise KernelBackendError(f"{ENV_VAR}={value!r} is not one of {', '.join(CHOICES)}: unset it or pick one")
    return value


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` can't run on ``device`` (None when it can)."""
    if backend == "torch":
        return None
    if backend in ("triton", "cuda"):
        if device.type != "cuda":
            return f"the {backend} backend needs CUDA tensors, got {device.type}"
        return f"the {backend} backend is not implemented yet in this version of polar-mamba"
    return f"unknown backend {backend!r}"


def choose_backend(device: torch.device | str = "cpu") -> str:
    """The backend a call on ``device`` will use, honouring ``POLAR_KERNELS``."""
    device = torch.device(device)
    want = requested_backend()
    if want != "auto":
        reason = unavailable_reason(want, device)
        if reason:
            raise KernelBackendError(f"{ENV_VAR}={want}: {reason}; set {ENV_VAR}=auto or torch")
        return want
    return next(b for b in PREFERENCE if unavailable_reason(b, device) is None)


def _announce(op: str, backend: str) -> None:
    if (op, backend) not in _announced:
        _announced.add((op, backend))
        log.info("kernel backend for %s: %s", op, backend)


def describe(device: torch.device | str = "cpu") -> dict[str, str]:
    """Backend per op plus why the faster ones are skipped (for ``polar info``)."""
    device = torch.device(device)
    out = {"requested": requested_backend()}
    try:
        out["selective_scan"] = choose_backend(device)
    except KernelBackendError as e:
        out["selective_scan"] = f"error: {e}"
    for b in PREFERENCE:
        reason = unavailable_reason(b, device)
        out[f"{b}_available"] = "yes" if reason is None else f"no ({reason})"
    return out


def selective_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact", return_last_state=False,
):
    """Selective scan with polarized channels; signature and shapes of :mod:`kernels.scan_ref`."""
    backend = choose_backend(u.device)
    _announce("selective_scan", backend)
    return scan_ref.selective_scan_chunked(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, n_ones, n_zeros, zero_mode, return_last_state
    )


def selective_step(
    state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
    n_ones=0, n_zeros=0, zero_mode="exact",
):
    """One decoding step; returns (y, new_state). See :func:`kernels.scan_ref.selective_step`."""
    backend = choose_backend(x.device)
    _announce("selective_step", backend)
    return scan_ref.selective_step(
        state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, n_ones, n_zeros, zero_mode
    )
