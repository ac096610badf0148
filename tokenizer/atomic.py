"""Atomic output directories: build next to the target, rename into place, never destroy on failure.

Shared by ``polar tokenizer train`` and ``polar prepare`` (``pretrain`` may import ``tokenizer``, not the reverse).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def write_atomically(out: str | os.PathLike, force: bool, fill: Callable[[Path], None]) -> None:
    """Build ``out`` in a sibling temporary directory with ``fill(tmp)``, then rename it into place.

    An existing ``out`` is refused without ``force``; with it, it is replaced only after ``fill`` succeeded.
    """
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
