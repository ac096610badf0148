"""Helpers for tests that run `polar train` end to end: tiny recipes and subprocess launches."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from pretrain.callbacks import EXIT_PREEMPTED
from pretrain.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, prepared: dict[str, str], name: str = "run", **sections) -> Path:
    cfg = {
        "run": {"name": name, "out_dir": str(tmp_path / "runs"), "seed": 7},
        "model": {"preset": "mamba-tiny-polar", "d_model": 32, "n_layer": 2, "vocab_size": 512},
        "data": {**prepared, "seq_len": 32, "micro_batch_size": 4, "global_batch_size": 16},
        "optim": {"lr": 3e-3},
        "schedule": {"steps": 8, "warmup_steps": 2},
        "distributed": {"zero_stage": 2},
        "precision": {"dtype": "fp32"},
        "checkpoint": {"every": 100, "keep_last": 3},
        "logging": {"progress_bar": False},
        "eval": {"every": 0, "batches": 2},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fault_env(**faults: int | list[int]) -> dict[str, str]:
    """The variables that load tests/fault_hooks.py into `polar train` with these faults (its docstring lists
    them): ``fault_env(signal_at_step=3, nonfinite_steps=[3, 4])``."""
    steps = {k: v if isinstance(v, list) else [v] for k, v in faults.items()}
    return {"POLAR_PLUGINS": "tests.fault_hooks", **{f"POLAR_FAULT_{k.upper()}": ",".join(map(str, v))
                                                      for k, v in steps.items()}}


def shell_env() -> dict[str, str]:
    """A fresh shell's environment: PATH with `polar` on it, this checkout importable, nothing else of ours."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ["HOME"],
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train(config: Path, nproc: int = 1, *overrides: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess:
    """`polar train` in fresh processes: plain python for one, torchrun for several; ``env`` adds variables
    (e.g. :func:`fault_env`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, "-m", "pretrain.cli", "train", str(config), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pretrain.cli", "train", str(config), *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def losses(run_dir: Path) -> list[tuple[int, str]]:
    """(step, loss as float hex) of every training line: exact bits, None where non-finite."""
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    return [(r["step"], None if r["loss"] is None else float.hex(r["loss"])) for r in records]


def ok(proc: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def preempted(proc: subprocess.CompletedProcess, nproc: int = 1) -> subprocess.CompletedProcess:
    """A run stopped by a signal: exit 75 (torchrun reports a failed worker as 1) after a checkpoint."""
    ok(proc, EXIT_PREEMPTED if nproc == 1 else 1)
    assert f"exiting {EXIT_PREEMPTED}" in proc.stdout
    return proc


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()
