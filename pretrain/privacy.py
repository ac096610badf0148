"""What may leave this machine in an exported or published folder (pretrain/export.py, pretrain/publish.py):
relative paths, dataset specs and Hub ids, never an absolute local path (a home directory, scratch space, a
cluster's layout) and never a credential.

:func:`public_path` / :func:`public_spec` reduce a path or dataset spec to what a folder may show: a Hub id, a
``builtin:``/``hf:`` spec or a clean relative path as it is; an absolute path (or one with ``~`` or ``..``)
relative to a base folder when inside it (a run's project folder, so the card's commands still run from there),
else its last component. :func:`check_private` refuses a folder that still holds one of the local absolute paths
it is given, the home or working directory, or the value of a credential in the environment (any variable whose
name contains TOKEN, KEY, SECRET, PASSWORD or CREDENTIAL).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.I)
REMOTE_SPEC = ("builtin:", "hf:")
BINARY_SUFFIXES = (".safetensors", ".bin", ".model", ".pt")


class PrivateDataError(RuntimeError):
    """A folder about to leave the machine holds a local absolute path or a credential."""


def _is_private(p: str) -> bool:
    return Path(p).is_absolute() or p.startswith("~") or ".." in Path(p).parts


def public_path(path: str | os.PathLike, base: str | os.PathLike | None = None) -> str:
    """``path`` as an exported or published file may show it (see the module docstring)."""
    p = str(path)
    if not _is_private(p):
        return p
    full = Path(p).expanduser().resolve()
    if base is not None:
        try:
            return str(full.relative_to(Path(base).expanduser().resolve())) or "."
        except ValueError:
            pass
    return full.name


def public_spec(spec: str, base: str | os.PathLike | None = None) -> str:
    """A dataset spec (``builtin:NAME``, ``hf:NAME...``, or comma-separated local files) with its local paths
    made public."""
    if spec.startswith(REMOTE_SPEC):
        return spec
    return ",".join(public_path(part, base) for part in spec.split(","))


def secret_values() -> dict[str, str]:
    """{variable name: value} of the credentials in the environment: values of 16+ characters, or of 8+ that are
    not a plain word (``TOKENIZERS_PARALLELISM=false`` or a word a card may hold is no secret to look for)."""
    return {k: v for k, v in os.environ.items()
            if SECRET_NAME.search(k) and (len(v) >= 16 or (len(v) >= 8 and not v.isalpha()))}


def _local_roots(paths: Iterable[str | os.PathLike]) -> set[str]:
    roots = {str(Path.home()), os.getcwd()}
    for p in paths:
        if p and _is_private(str(p)):
            roots |= {str(p), str(Path(p).expanduser().resolve())}
    return {r for r in roots if len(Path(r).parts) > 2}  # "/" or "/root" alone is too short to mean a path


def check_private(folder: str | os.PathLike, local_paths: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse ``folder`` when any of its text files holds a credential from the environment, the home or working
    directory, or one of ``local_paths`` written absolutely; the message names the file and what it holds, never
    the secret itself."""
    secrets, roots = secret_values(), _local_roots(local_paths)
    for f in sorted(Path(folder).rglob("*")):
        if not f.is_file() or f.suffix in BINARY_SUFFIXES:
            continue
        text = f.read_text(errors="replace")
        leak = next((f"the value of ${k}" for k, v in secrets.items() if v in text), None) or next(
            (f"the local path {r}" for r in sorted(roots) if r in text), None)
        if leak:
            raise PrivateDataError(f"{f} holds {leak}: a published folder may name relative paths, dataset "
                                   "specs and Hub ids only (report this as a bug)")
