"""Lazy ``triton.jit``: a kernel decides between the compiler and the interpreter when it is launched.

``triton.jit`` reads ``TRITON_INTERPRET`` once, when the kernel is decorated (at import). Deciding at
launch instead lets one process run compiled kernels on CUDA tensors and the Triton interpreter on CPU
tensors (tests set ``TRITON_INTERPRET=1`` per test), whatever was imported first. The catch: triton's
own @jit helpers (``tl.sum``, ``tl.max``, ``tl.zeros``, ``tl.sigmoid``...) were built for one mode at import,
so while an interpreted kernel runs, compiled-mode helpers are routed to the interpreter too. The same holds
for our own helpers and scan combine functions: decorate them with plain ``triton.jit`` (compiled mode).

:func:`capture` records launches instead of running them (tensors may be on the ``meta`` device), so the
shipped wrappers, with their real block sizes and flags, can be compiled offline for a GPU this machine
does not have (benchmarks/compile_kernels.py).
"""

from __future__ import annotations

import contextlib
import functools
import os


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, e.g. on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


@contextlib.contextmanager
def _helpers_interpreted():
    """Inside: calling a compiled-mode ``JITFunction`` (a triton.language helper) interprets its body."""
    from triton.runtime.jit import JITFunction

    original = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted(self.fn)(*args, **kwargs)
    try:
        yield
    finally:
        JITFunction.__call__ = original


_captured: list | None = None


@contextlib.contextmanager
def capture():
    """Inside, launches are recorded as (kernel, grid, args, kwargs) in the yielded list, not run."""
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


def capturing() -> bool:
    """True inside :func:`capture` (launches are recorded, not run)."""
    return _captured is not None


class LazyKernel:
    """Launch with ``kernel[grid](*args)`` as a ``triton.jit`` kernel; one build per mode, cached."""

    def __init__(self, fn, do_not_specialize=()):
        self.fn = fn
        self.do_not_specialize = tuple(do_not_specialize)
        self._built: dict[str, object] = {}

    @property
    def compiled(self):
        """The compiled-mode ``JITFunction`` (what a CUDA launch runs)."""
        if "compiled" not in self._built:
            from triton.runtime.jit import JITFunction

            self._built["compiled"] = JITFunction(self.fn, do_not_specialize=self.do_not_specialize)
        return self._built["compiled"]

    def __getitem__(self, grid):
        if _captured is not None:
            return lambda *args, **kwargs: _captured.append((self, grid, args, kwargs))
        if not interpreting():
            return self.compiled[grid]
        launch = _interpreted(self.fn)[grid]

        def run(*args, **kwargs):
            with _helpers_interpreted():
                return launch(*args, **kwargs)

        return run


def jit(fn=None, *, do_not_specialize=()):
    """``@jit`` or ``@jit(do_not_specialize=("L",))``: arguments never specialized on their value (so a new
    sequence length reuses the compiled kernel)."""
    if fn is None:
        return lambda f: LazyKernel(f, do_not_specialize)
    return LazyKernel(fn, do_not_specialize)
