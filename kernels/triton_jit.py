"""Lazy ``triton.jit``: a kernel decides between the compiler and the interpreter when it is launched.

``triton.jit`` reads ``TRITON_INTERPRET`` once, when the kernel is decorated (at import). Deciding at
launch instead lets one process run compiled kernels on CUDA tensors and the Triton interpreter on CPU
tensors (tests set ``TRITON_INTERPRET=1`` per test), whatever was imported first. The catch: triton's
own @jit helpers (``tl.sum``, ``tl.max``, ``tl.zeros``, ``tl.sigmoid``...) were built for one mode at import,
so while an interpreted kernel runs, compiled-mode helpers are routed to the interpreter too. Our kernels
call no jit functions of their own (those would be bound to one mode): they are written self-contained.
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


class LazyKernel:
    """Launch with ``kernel[grid](*args)`` as a ``triton.jit`` kernel; one build per mode, cached."""

    def __init__(self, fn):
        self.fn = fn
        self._built: dict[str, object] = {}

    def __getitem__(self, grid):
        if not interpreting():
            if "compiled" not in self._built:
                from triton.runtime.jit import JITFunction

                self._built["compiled"] = JITFunction(self.fn)
            return self._built["compiled"][grid]
        launch = _interpreted(self.fn)[grid]

        def run(*args, **kwargs):
            with _helpers_interpreted():
                return launch(*args, **kwargs)

        return run


def jit(fn) -> LazyKernel:
    return LazyKernel(fn)
