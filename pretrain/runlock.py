"""One writer per run directory, and no worker outliving its launcher.

:class:`RunLock` is an exclusive ``fcntl.flock`` on ``RUN/train.lock``, taken by rank 0 for the life of a
training job. The kernel releases it when the holding process dies (kill -9, power loss, OOM), so a
requeued job is never blocked by a stale file; the file's content (host, pid, start time) only names the
holder in the error a second trainer gets. :func:`exit_with_launcher` makes a torchrun/deepspeed worker
die with its launcher: they start workers in sessions of their own, so killing the launcher's process
group would otherwise leave them running, saving checkpoints and appending metrics to a run that a
resumed job already owns.

The holder writes its name into the file only with its first write to the run (:meth:`RunLock.record`),
so a job refused for bad input leaves every file of the run as it was, the lock file included; and
:func:`removed_if_refused` takes away the lock file and run folders such a job created.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import time
from pathlib import Path

LOCK_FILE = "train.lock"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """Exclusive lock on a run directory (non-blocking: a second holder fails at once)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.read(fd, 4096))
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is being trained by {holder}: wait for it, stop it, or use another run.name"
            ) from None
        self._fd = fd
        return self

    def record(self) -> None:
        """Name this process as the holder (host, pid, time) for the error a second trainer gets."""
        info = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


@contextlib.contextmanager
def removed_if_refused(run_dir: Path):
    """Around a job's start-up: when it is refused (any error but a held lock), the lock file and the run
    folders it created are removed (folders only when nothing else was put in them)."""
    run_dir = Path(run_dir)
    created = [p for p in (run_dir / LOCK_FILE, run_dir, *run_dir.parents) if not p.exists()]
    try:
        yield
    except RunLockedError:
        raise
    except BaseException:
        if int(os.environ.get("RANK", "0")) == 0:
            for p in created:
                try:
                    p.unlink() if p.name == LOCK_FILE else p.rmdir()
                except OSError:
                    break
        raise


def _describe(raw: bytes) -> str:
    """The recorded holder; a record left by an earlier holder means the new one is still starting up."""
    try:
        info = json.loads(raw)
        host, pid = info["host"], int(info["pid"])
    except (ValueError, KeyError, TypeError):
        return "another process (starting up)"
    if host == socket.gethostname() and not _alive(pid):
        return "another process (starting up)"
    return f"pid {pid} on {host} (since {info['since']})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def exit_with_launcher() -> None:
    """Under a launcher (torchrun / deepspeed set LOCAL_RANK), get SIGKILL when the parent dies.

    ``PR_SET_PDEATHSIG`` is delivered when the parent thread exits; checking the parent pid after
    setting it closes the race where the launcher died first."""
    if "LOCAL_RANK" not in os.environ or not hasattr(os, "getppid"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not Linux: no orphan protection, nothing else changes
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGKILL)
