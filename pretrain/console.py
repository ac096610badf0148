"""Where `polar`'s log records go: the terminal shows results, progress and problems; the chatter of
libraries and of our per-op kernel choices goes only to the log file (``$POLAR_LOG``, default
``~/.cache/polar-mamba/polar.log``), or to the terminal too with ``polar -v``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# INFO records of these loggers are bookkeeping (one line per kernel op chosen; DeepSpeed's set-up).
QUIET = ("kernels.dispatch", "DeepSpeed")
FORMAT = "%(asctime)s %(name)s: %(message)s"


def log_file() -> Path:
    return Path(os.environ.get("POLAR_LOG") or Path.home() / ".cache" / "polar-mamba" / "polar.log")


def configure_logging(verbose: bool) -> None:
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        console.addFilter(lambda r: r.levelno >= logging.WARNING or not r.name.startswith(QUIET))
    handlers: list[logging.Handler] = [console]
    try:
        log_file().parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file()))
    except OSError:  # a read-only home: the terminal still gets everything it would
        pass
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=FORMAT, handlers=handlers,
                        force=True)


def quiet_deepspeed_accelerator() -> None:
    """DeepSpeed prints a warning on stdout when it guesses the accelerator at import; naming it (what the
    guess would find) keeps the terminal clean. Call before deepspeed is imported."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
