"""The peer kernels the device run times beside ours: which releases, how the carried folder is built, how they load.

The GPU machine cannot download, so the peers travel with the working tree in a git-ignored folder (``.peers/``,
carried by the run tool) holding the registry's own files, checked by sha256:

- ``fla-core`` 0.6.0 (a pure-Python wheel): Triton ``causal_conv1d``, ``rms_norm`` (with a residual, prenorm) and
  the fused linear cross-entropy, direct peers of our conv, add+RMSNorm and loss kernels.
- ``mamba_ssm`` 2.3.2.post1 (the sdist; PyPI has no wheel): only its Triton SSD (``ops/triton/ssd_combined.py``,
  a Mamba-2 peer) is used. The package ``__init__`` imports the compiled extension (``selective_scan_cuda``),
  so :func:`load` registers a bare ``mamba_ssm`` package whose ``__path__`` is the extracted sources and imports
  the Triton modules below it; the ``__init__`` never runs.

Build (needs the registry; ~1.3 MB): ``python benchmarks/peers.py [--dir .peers]`` (``make peers``; idempotent).
Load: :func:`load` unpacks both into a temporary target and returns the peer functions (or why not, per peer).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / ".peers"
# file name -> (pip requirement, sha256 of the registry's file)
FILES = {
    "fla_core-0.6.0-py3-none-any.whl": (
        "fla-core==0.6.0", "b0708b70e0b119cd58a0a5146ea56cb175cef6ed969d8ac60267e3e077ce3ebd"),
    "mamba_ssm-2.3.2.post1.tar.gz": (
        "mamba_ssm==2.3.2.post1", "104cc47e9101e5401a675fa2b784f2952b9b037f3b1dd83b5ac544394e95d028"),
}
TARGET_PREFIX = "polar-peers-"  # the temporary target's name (the CPU rehearsal's import blocker allows it)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(folder: Path = FOLDER) -> list[Path]:
    """Download every peer file into ``folder`` (kept when present with the pinned hash); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (requirement, digest) in FILES.items():
        path = folder / name
        if path.is_file() and _sha256(path) == digest:
            continue
        # mamba_ssm's setup.py runs to prepare metadata even for a download: skip its CUDA build (needs torch here)
        env = dict(os.environ, MAMBA_SKIP_CUDA_BUILD="TRUE")
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-build-isolation", "-d", str(folder),
               requirement]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"peers: pip download {requirement} failed: {tail[0]}")
        if _sha256(path) != digest:
            raise SystemExit(f"peers: {path} does not have the pinned sha256 {digest} (the registry's file changed?)")
    return [folder / name for name in FILES]


def _unpack_fla(wheel: Path, target: Path) -> None:
    with zipfile.ZipFile(wheel) as z:  # a pure-Python wheel: installing it is unpacking it
        z.extractall(target, [n for n in z.namelist() if n.startswith("fla/")])


def _unpack_mamba_ssm(sdist: Path, target: Path) -> Path:
    """The sdist's Python sources of ``mamba_ssm/`` (no csrc); returns the package directory."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/mamba_ssm/" in m.name and m.name.endswith(".py")]
        for m in members:
            m.name = m.name.split("/", 1)[1]  # drop the "mamba_ssm-<version>/" prefix
        tar.extractall(target, members, filter="data")
    return target / "mamba_ssm"


def load(folder: Path = FOLDER, target: Path | None = None, only: str | None = None) -> tuple[dict, dict]:
    """Unpack the carried peers (``only``: "fla" or "mamba_ssm") into ``target`` (a fresh temporary folder by
    default) and import them.

    Returns (functions, errors): ``fla_conv``, ``fla_rms_norm``, ``fla_linear_ce``, ``mamba_ssd`` for each peer
    that imported, and one line per peer that did not (missing file, import error)."""
    target = target or Path(tempfile.mkdtemp(prefix=TARGET_PREFIX))
    functions, errors = {}, {}
    wanted = [only] if only else ["fla", "mamba_ssm"]
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        msg = f"{', '.join(missing)} not in {folder} (build it: python benchmarks/peers.py; carry it to the device)"
        return functions, dict.fromkeys(wanted, msg)
    sys.path.insert(0, str(target))
    if "fla" in wanted:
        _import_fla(folder, target, functions, errors)
    if "mamba_ssm" in wanted:
        _import_mamba_ssd(folder, target, functions, errors)
    return functions, errors


def _import_fla(folder: Path, target: Path, functions: dict, errors: dict) -> None:
    try:
        _unpack_fla(folder / "fla_core-0.6.0-py3-none-any.whl", target)
        functions["fla_conv"] = importlib.import_module("fla.modules.causal_conv1d.ops").causal_conv1d
        functions["fla_rms_norm"] = importlib.import_module("fla.modules.norm.layernorm").rms_norm
        functions["fla_linear_ce"] = importlib.import_module(
            "fla.modules.fused_linear_cross_entropy.ops").fused_linear_cross_entropy_loss
    except Exception as e:  # any import failure is reported, the other peer still loads
        errors["fla"] = f"{type(e).__name__}: {e}"


def _import_mamba_ssd(folder: Path, target: Path, functions: dict, errors: dict) -> None:
    try:
        package = types.ModuleType("mamba_ssm")  # stands in for mamba_ssm/__init__.py (the CUDA extension import)
        package.__path__ = [str(_unpack_mamba_ssm(folder / "mamba_ssm-2.3.2.post1.tar.gz", target))]
        sys.modules["mamba_ssm"] = package
        functions["mamba_ssd"] = importlib.import_module(
            "mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
    except Exception as e:
        errors["mamba_ssm"] = f"{type(e).__name__}: {e}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=FOLDER, help="the folder to fill (git-ignored; carried to the device)")
    args = p.parse_args(argv)
    paths = build(args.dir)
    size = sum(path.stat().st_size for path in paths)
    print(f"{args.dir}: {', '.join(path.name for path in paths)} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
