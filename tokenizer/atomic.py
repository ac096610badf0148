"""The one way a command writes a result (docs/training.md, "Crash safety"): a file or a folder is built in a
hidden temporary sibling (``.NAME.tmp-HOST-PID``), flushed to the disk, then renamed into place, so a crash
leaves the previous output or the new one, never a half-written one. A failed write (disk full, permissions, a
read-only file system, a quota) removes what it wrote, leaves the previous output as it was and raises
:class:`OutputError`, which `polar` prints as one line naming the path, the free space and the fix.
Temporary siblings left by a dead process are removed by the next write into the same folder (the next run of
the command), one line each.

Used by every writer (prepare, tokenizer train, export, publish, evaluation results, sweeps, MQAR cells,
studies, diagnose, checkpoints' small files); it lives in ``tokenizer``, the bottom layer every package may
import.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_RE = re.compile(r"^\.(?P<stem>.+)\.(?P<what>tmp|old)-(?P<host>[0-9a-f]{6})-(?P<pid>\d+)(?P<ext>\.[^.]+)?$")
HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]  # pids are judged only on their own host
_FIXES = {  # the write failures a user can fix; any other OSError (a missing input) passes unchanged
    errno.ENOSPC: "free space on it or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EACCES: "fix the permissions or write elsewhere",
    errno.EPERM: "fix the permissions or write elsewhere",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.EIO: "check the disk or write elsewhere",
    errno.EFBIG: "write to a file system that takes larger files",
}


class OutputError(OSError):
    """An output could not be written; nothing partial is left and the previous output is untouched."""

    def __init__(self, out: Path, error: OSError):
        super().__init__(error.errno, error.strerror or str(error), error.filename or str(out))
        free = ""
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = f"; {shutil.disk_usage(_existing(out)).free / 2**30:.2f} GiB free on {_existing(out)}"
        self.message = (f"writing {out} failed: {self.strerror} ({self.filename}){free}: "
                        f"{_FIXES.get(error.errno, 'fix the cause')}, then run again")

    def __str__(self) -> str:
        return self.message


def output_error(out: Path, error: BaseException) -> BaseException:
    """``error`` as the one-line :class:`OutputError` about ``out`` when it is a write failure, else unchanged.
    Writers in Rust (safetensors, tokenizers) raise their I/O failures as other exceptions whose message ends
    in ``(os error N)``: they are write failures too."""
    if isinstance(error, OutputError):
        return error
    code = error.errno if isinstance(error, OSError) else (
        int(m[1]) if (m := re.search(r"\(os error (\d+)\)", str(error))) else None)
    if code not in _FIXES:
        return error
    wrapped = OutputError(Path(out), error if isinstance(error, OSError) else OSError(code, os.strerror(code)))
    wrapped.__cause__ = error
    return wrapped


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a temporary sibling (or anything inside one): readers ignore it, it is never a result."""
    return any(TEMP_RE.match(part) for part in Path(path).parts)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush ``path`` (a file, or every file and directory entry under a folder) to the disk."""
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def _started(pid: int) -> float:
    """When process ``pid`` started (seconds since the epoch; 0 where /proc cannot tell)."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return 0.0
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _alive(pid: int, since: float) -> bool:
    """The process that named a temporary ``pid`` (last changed at ``since``) still runs, and is not a newer
    one that reuses the number."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return since >= _started(pid) - 2


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sibling(out: Path, what: str = "tmp", pid: int | None = None) -> Path:
    """The hidden temporary sibling of ``out`` (``.NAME.tmp-HOST-PID.EXT``: HOST a hash of the host name, the
    suffix kept, so writers that infer a format from it, as matplotlib does, still can)."""
    return out.with_name(f".{out.stem}.{what}-{HOST}-{os.getpid() if pid is None else pid}{out.suffix}")


def clean_stale(folder: Path) -> None:
    """Remove the temporary siblings in ``folder`` left by dead processes of this host (an ``old`` one whose
    replacement never landed is put back), one line each: the next write into a folder (a rerun of the
    command, whose timestamped results may have new names) cleans up after the one that died there."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = TEMP_RE.match(p.name)
        if not m or m["host"] != HOST or _alive(int(m["pid"]), p.lstat().st_mtime):
            continue
        out = p.with_name(m["stem"] + (m["ext"] or ""))
        if m["what"] == "old" and not out.exists():
            os.replace(p, out)
            log.warning("restored %s from %s, left by a dead process (pid %s)", out, p.name, m["pid"])
        else:
            _remove(p)
            log.warning("removed %s, left by a dead process (pid %s)", p, m["pid"])


def write_atomically(out: str | os.PathLike, fill: Callable[[Path], object] | dict[str, Callable[[Path], object]],
                     force: bool = True, folder: bool = True) -> Path:
    """Build ``out`` (a folder, or a file with ``folder=False``) at a temporary sibling with ``fill(tmp)``,
    flush it, and rename it into place. ``fill`` may instead map file names to fills: the files of one
    result in the folder ``out``, all built before any is renamed into place (a fill that writes nothing
    leaves its file out). An existing output is refused without ``force``; with it, it is replaced only
    after every fill succeeded. A write failure (``OSError``: disk full, permissions, ...) becomes
    :class:`OutputError`."""
    out = Path(out)
    fills = {out / n: f for n, f in fill.items()} if isinstance(fill, dict) else {out: fill}
    for parent in {path.parent for path in fills}:
        clean_stale(parent)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it")
    is_folder = folder and not isinstance(fill, dict)
    moved: list[tuple[Path, Path]] = []
    try:
        (out if isinstance(fill, dict) else out.parent).mkdir(parents=True, exist_ok=True)
        for path, f in fills.items():
            _remove(sibling(path))
            if is_folder:
                sibling(path).mkdir()
            f(sibling(path))
            if sibling(path).exists():
                fsync_tree(sibling(path))
        for path in fills:
            if not sibling(path).exists():
                continue
            if is_folder and path.exists():  # a folder cannot replace another in one rename: move it aside
                os.replace(path, sibling(path, "old"))
                moved.append((sibling(path, "old"), path))
            os.replace(sibling(path), path)
        fsync_dir(out if isinstance(fill, dict) else out.parent)
    except Exception as e:
        for old, path in moved:
            if not path.exists():
                os.replace(old, path)
        raise output_error(out, e)  # noqa: B904 - its cause is set there (or it is e itself)
    finally:
        for path in fills:
            _remove(sibling(path))
            _remove(sibling(path, "old"))
    return out


def write_text(path: str | os.PathLike, text: str) -> Path:
    """A whole text file, written atomically (replacing the previous one)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text), folder=False)
