"""Every reader survives damage: exit code 2, exactly one line on stderr (no traceback), and every file that
existed before is byte-identical afterwards."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.train_helpers import ROOT, ok, train, write_config

pytestmark = pytest.mark.slow


def polar(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, data) -> Path:
    """A folder holding a copy of the prepared data, a 4-step run (checkpoints at 2 and 4) and its export."""
    root = tmp_path_factory.mktemp("bad-input")
    shutil.copytree(data["path"], root / "data")
    cfg = write_config(root, {**data, "path": str(root / "data")}, schedule={"steps": 4},
                       checkpoint={"every": 2}, distributed={"zero_stage": 0})
    ok(train(cfg))
    ok(polar("export", str(root / "runs" / "run"), "--out", str(root / "export"), cwd=root))
    return root


@pytest.fixture()
def damaged(world, tmp_path) -> Path:
    """A private copy of the world, to damage."""
    shutil.copytree(world, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def test_shard_damaged_after_prepare_names_shard_and_offset(damaged):
    shard = damaged / "data" / "train_00000.bin"
    tokens = np.memmap(shard, dtype="<u2", mode="r+")
    tokens[::997] = 60_000  # same size, ids past the 512-piece vocabulary
    tokens.flush()
    del tokens
    tokenizer = yaml.safe_load((damaged / "run.yaml").read_text())["data"]["tokenizer"]
    cfg = write_config(damaged, {"path": str(damaged / "data"), "tokenizer": tokenizer}, name="fresh")
    before = hashes(damaged)
    line = refused(polar("train", str(cfg), cwd=damaged), "train_00000.bin is corrupt: token id 60000 at token offset")
    assert "re-run polar prepare" in line
    after = hashes(damaged)
    assert {k: after[k] for k in before} == before


def test_negative_warmup_is_refused_before_anything_is_written(damaged):
    before = hashes(damaged)
    refused(polar("train", str(damaged / "run.yaml"), "--schedule.warmup_steps", "-1", cwd=damaged),
            "schedule.warmup_steps must be >= 0, got -1")
    assert hashes(damaged) == before


@pytest.mark.parametrize("command", [["export", "{run}", "--out", "{tmp}/x"], ["eval", "niah", "{run}"],
                                     ["diagnose", "{run}", "--out", "{tmp}/d"]])
def test_truncated_checkpoint_names_the_file_and_the_steps_left(damaged, command):
    weights = damaged / "runs" / "run" / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = hashes(damaged)
    args = [a.format(run=damaged / "runs" / "run", tmp=damaged) for a in command]
    refused(polar(*args, cwd=damaged), "step_00000004 is truncated or corrupt", "--step N (steps available: 2)")
    assert hashes(damaged) == before


@pytest.mark.parametrize("command", [["eval", "niah", "{export}"], ["diagnose", "{export}", "--out", "{tmp}/d"]])
def test_truncated_export_names_the_file(damaged, command):
    weights = damaged / "export" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 1000])
    before = hashes(damaged)
    args = [a.format(export=damaged / "export", tmp=damaged) for a in command]
    refused(polar(*args, cwd=damaged), "model.safetensors is truncated or corrupt", "polar export RUN --force")
    assert hashes(damaged) == before


@pytest.mark.parametrize("target", ["runs/nope", "./nope", "nope"])
def test_missing_path_is_not_found_not_a_hub_error(damaged, target):
    before = hashes(damaged)
    line = refused(polar("eval", "niah", target, cwd=damaged), f"{target} not found")
    assert "Hub gave no model" not in line or target.count("/") == 1
    assert hashes(damaged) == before
