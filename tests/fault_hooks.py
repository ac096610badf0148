"""Fault injection for the training tests, as a plugin: `polar train` with ``POLAR_PLUGINS=tests.fault_hooks``
(tests.train_helpers.fault_env sets it) imports this module in every process of the run, and
these variables choose the faults (comma-separated steps):

* ``POLAR_FAULT_NONFINITE_STEPS=3,4``: these optimizer steps' losses are NaN on every rank (a non-finite value
  with a clean graph, like an overflow in the loss reduction), caught by the trainer's own check;
* ``POLAR_FAULT_SIGNAL_AT_STEP=3``: rank 0 sends itself SIGTERM after step 3 (the real preemption path);
* ``POLAR_FAULT_FAIL_SAVE_AT_STEP=6``: step 6's checkpoint fails with ENOSPC after its files are written,
  before they are flushed and committed;
* ``POLAR_FAULT_KILL_AFTER_SAVE_AT_STEP=4``: the process SIGKILLs itself as soon as step 4's checkpoint is
  committed (whatever the callbacks after the checkpoint would still have done is lost);
* ``POLAR_FAULT_DISK_FULL=1`` (any command): the disk is full for every new output (:func:`full_open`).
"""

from __future__ import annotations

import builtins
import errno
import io
import math
import os
import signal

from pretrain import checkpoint as ckpt
from pretrain.hooks import Callback, register_callback
from tokenizer.atomic import is_temporary


def full_open(real=io.open):
    """``open`` on a full disk for new outputs: a file opened for writing inside a temporary sibling (an output
    being built, tokenizer/atomic.py) is created, then its write fails with ENOSPC. Python's, torch's,
    matplotlib's and our shard writers all open through it."""
    def open_(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        if isinstance(file, str | os.PathLike) and set(mode) & set("wax+") and is_temporary(file):
            f.close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return f
    return open_


if os.environ.get("POLAR_FAULT_DISK_FULL"):
    builtins.open = io.open = full_open()


def _steps(name: str) -> set[int]:
    return {int(s) for s in os.environ.get(f"POLAR_FAULT_{name}", "").split(",") if s.strip()}


@register_callback
class Faults(Callback):
    """Reads the variables per run, so a registration left in a process without them (pytest itself, after an
    in-process `polar` call) does nothing."""

    def __init__(self):
        self.nonfinite, self.signal = _steps("NONFINITE_STEPS"), _steps("SIGNAL_AT_STEP")
        self.failing = {f"{ckpt.tag_for(s)}{ckpt.PARTIAL_SUFFIX}" for s in _steps("FAIL_SAVE_AT_STEP")}
        self.kill = _steps("KILL_AFTER_SAVE_AT_STEP")
        self.fsync_tree, self.save = ckpt.fsync_tree, ckpt.save

    def on_fit_start(self, trainer):
        # pretrain.checkpoint calls these by their module names: the commit protocol itself is unchanged
        if self.failing:
            ckpt.fsync_tree = self._failing_fsync_tree
        if self.kill:
            ckpt.save = self._save_then_kill

    def _failing_fsync_tree(self, path):
        if path.name in self.failing:  # every rank has written its files, none is flushed or committed
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.fsync_tree(path)

    def _save_then_kill(self, engine, ckpt_dir, step, *args, **kwargs):
        tag = self.save(engine, ckpt_dir, step, *args, **kwargs)
        if step in self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        return tag

    def on_loss(self, trainer, loss):
        return loss + math.nan if trainer.state.step + 1 in self.nonfinite else loss  # step N runs at state.step N-1

    def on_step_end(self, trainer, record):
        step = trainer.state.step
        if step in self.signal and trainer.is_main:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_end(self, trainer, stop):
        ckpt.fsync_tree, ckpt.save = self.fsync_tree, self.save
