"""Where `polar`'s log records go: the terminal shows results, progress and problems; the chatter of
libraries and of our per-op kernel choices goes only to the log file (``$POLAR_LOG``, default
``~/.cache/polar-mamba/polar.log``), or to the terminal too with ``polar -v``. DeepSpeed, which prints and
logs to stdout by itself, is imported through :func:`import_deepspeed` and its printing wrapped in
:func:`output_to_log`."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

# INFO records of these loggers are bookkeeping (one line per kernel op chosen; DeepSpeed's set-up and what it
# prints while reading a checkpoint).
QUIET = ("kernels.dispatch", "DeepSpeed", "deepspeed")
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


class _LogLines(io.TextIOBase):
    """A text stream whose lines become INFO records of ``logger``; of a line redrawn with carriage returns (a
    progress bar) only the last drawing, what a terminal would have shown."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.pending = logger, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        if line := line.rsplit("\r", 1)[-1].strip():
            self.logger.info(line)

    def close(self) -> None:
        self._emit(self.pending)
        self.pending = ""
        super().close()


@contextlib.contextmanager
def output_to_log(logger_name: str) -> Iterator[None]:
    """What Python code prints (stdout and stderr) inside the block goes to the log as ``logger_name``'s INFO
    records instead of the terminal: for libraries that print rather than log."""
    stream = _LogLines(logging.getLogger(logger_name))
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield
    finally:
        stream.close()


def import_deepspeed():
    """``import deepspeed`` with its output in the log: what it prints while importing (the accelerator it
    detects) and its logger, which otherwise writes to stdout by itself, go through our handlers (its INFO
    records to the log file only). The accelerator is named as the detection would find it, which skips the
    probing. Returns the module."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    with output_to_log("deepspeed"):
        import deepspeed
    ds_logger = logging.getLogger("DeepSpeed")
    for handler in ds_logger.handlers[:]:
        ds_logger.removeHandler(handler)
    ds_logger.propagate = True
    ds_logger.setLevel(logging.INFO)
    return deepspeed
