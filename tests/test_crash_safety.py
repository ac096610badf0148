"""Crash safety of a run directory: one writer (run lock, no orphaned workers), checkpoints committed like a
database (a failed save changes nothing, `latest` falls back to the newest complete tag, rotation follows
the run's lineage), torn metrics lines, and the RNG contract."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain import checkpoint as ckpt
from pretrain.runlock import RunLock, RunLockedError
from tests.train_helpers import ROOT, fault_env, losses, ok, preempted, train, tree_hash, write_config

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _endless_training(tmp_path: Path, data: dict, nproc: int):
    """An endless run (`polar train` under its launcher, in a session of its own) that holds its lock and has a
    checkpoint; SIGKILLed with its launcher's process group on exit. Yields (config, run dir, launcher)."""
    cfg = write_config(tmp_path, data, schedule={"steps": 100_000}, checkpoint={"every": 2})
    run_dir = tmp_path / "runs" / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "pretrain.cli", "train", str(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: _holder(run_dir) and _checkpointed(run_dir), "training to start")
        yield cfg, run_dir, proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group: torchrun's workers are in sessions of their own
        proc.wait()


def _wait_for(predicate, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _holder(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "train.lock").read_text())
    except (OSError, ValueError):
        return None


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead orphan may wait for a reaper that this sandbox lacks)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _checkpointed(run_dir: Path) -> bool:
    return bool(ckpt.list_tags(run_dir / "checkpoints"))


def _finish_from_latest(cfg: Path, run_dir: Path, extra_steps: int = 2) -> subprocess.CompletedProcess:
    """Resume a killed endless run and end it a few steps after its newest checkpoint."""
    step = ckpt.step_of(ckpt.resume_tag(run_dir / "checkpoints"))
    out = ok(train(cfg, 1, "--schedule.steps", str(step + extra_steps)))
    assert f"(step {step})" in out.stdout
    return out


def test_second_trainer_is_refused_and_a_dead_holder_blocks_nobody(tmp_path, data):
    with _endless_training(tmp_path, data, 1) as (cfg, run_dir, first):
        second = train(cfg)
        assert second.returncode == 2
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and f"pid {first.pid} on " in err[0] and "is being trained by" in err[0], err
    _finish_from_latest(cfg, run_dir)  # the kernel dropped the dead holder's lock: a requeue just works


@pytest.mark.distributed
def test_killing_the_launcher_leaves_no_worker(tmp_path, data):
    with _endless_training(tmp_path, data, 2) as (cfg, run_dir, launcher):
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
    _wait_for(lambda: not any(_running(p) for p in workers), "the orphaned workers to exit", timeout=30)
    _finish_from_latest(cfg, run_dir)


def test_failed_save_changes_nothing_and_the_run_resumes(tmp_path, data):
    cfg = write_config(tmp_path, data, schedule={"steps": 4}, checkpoint={"every": 2})
    run_dir, ckpt_dir = tmp_path / "runs" / "run", tmp_path / "runs" / "run" / "checkpoints"
    ok(train(cfg))
    before = {t: tree_hash(ckpt_dir / t) for t in ckpt.list_tags(ckpt_dir)}
    entries = sorted(p.name for p in ckpt_dir.iterdir())
    failed = train(cfg, 1, "--schedule.steps", "8", env=fault_env(fail_save_at_step=6))
    assert failed.returncode == 2
    err = failed.stderr.strip().splitlines()[-1]
    assert "step_00000006" in err and "No space left on device" in err and "GiB free" in err, err
    assert {t: tree_hash(ckpt_dir / t) for t in ckpt.list_tags(ckpt_dir)} == before
    assert ckpt.latest_tag(ckpt_dir) == "step_00000004"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == entries  # no partial tag
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "save_failed" and "No space left" in status["reason"]
    ok(train(cfg, 1, "--schedule.steps", "8"))
    assert [s for s, _ in losses(run_dir)] == list(range(1, 9))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> list:
    """Losses (float hex) of an uninterrupted 6-step run."""
    tmp = tmp_path_factory.mktemp("reference")
    ok(train(write_config(tmp, data, schedule={"steps": 6}, checkpoint={"every": 2})))
    return losses(tmp / "runs" / "run")


def test_latest_naming_a_deleted_tag_resumes_from_the_newest_complete_one(tmp_path, data, reference):
    cfg = write_config(tmp_path, data, schedule={"steps": 6}, checkpoint={"every": 2})
    run_dir, ckpt_dir = tmp_path / "runs" / "run", tmp_path / "runs" / "run" / "checkpoints"
    preempted(train(cfg, env=fault_env(signal_at_step=3)))
    named = ckpt.latest_tag(ckpt_dir)
    *_, previous, last = ckpt.list_tags(ckpt_dir)
    assert last == named
    shutil.rmtree(ckpt_dir / named)  # `latest` still names it
    out = ok(train(cfg))
    assert f"(step {ckpt.step_of(previous)})" in out.stdout
    assert f"{named}, which is missing or incomplete: resuming from {previous}" in out.stderr
    assert losses(run_dir) == reference


def test_torn_metrics_line_is_dropped_and_resume_stays_bitwise(tmp_path, data, reference):
    cfg = write_config(tmp_path, data, schedule={"steps": 6}, checkpoint={"every": 2})
    run_dir = tmp_path / "runs" / "run"
    preempted(train(cfg, env=fault_env(signal_at_step=3)))
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 4, "lo')  # a crash mid-write
    n = len((run_dir / "metrics.jsonl").read_text().splitlines())
    out = ok(train(cfg))
    assert f"metrics.jsonl line {n} is torn or corrupt" in out.stderr
    assert losses(run_dir) == reference


def test_rotation_keeps_the_current_lineage_and_the_resume_tag(tmp_path, data):
    cfg = write_config(tmp_path, data, schedule={"steps": 12}, checkpoint={"every": 4, "keep_last": 2})
    ckpt_dir = tmp_path / "runs" / "run" / "checkpoints"

    def steps() -> list[int]:
        return sorted(ckpt.step_of(t) for t in ckpt.list_tags(ckpt_dir))

    ok(train(cfg))
    assert steps() == [8, 12]
    ckpt.atomic_write(ckpt_dir / "latest", "step_00000008")  # roll back: step 12 is now another lineage
    stale = tree_hash(ckpt_dir / "step_00000012")
    preempted(train(cfg, 1, "--checkpoint.every", "1", env=fault_env(signal_at_step=9)))  # stops after step 10
    # highest-step rotation would keep only 10 and 12, deleting 8 (resumed from) and 9 (newer than 12)
    assert steps() == [8, 9, 10, 12] and ckpt.latest_tag(ckpt_dir) == "step_00000010"
    assert tree_hash(ckpt_dir / "step_00000012") == stale
    ok(train(cfg, 1, "--checkpoint.every", "1"))  # from 10: writes 11 and a new 12 in place of the stale one
    assert steps() == [10, 11, 12]  # 10 is this job's resume point
    state = ckpt.read_state(ckpt_dir, "step_00000012")
    assert state["parent"] == "step_00000011" and state["ancestors"][-3:] == [ckpt.tag_for(s) for s in (9, 10, 11)]
    assert tree_hash(ckpt_dir / "step_00000012") != stale


def test_run_lock_is_exclusive_and_released_with_its_holder(tmp_path):
    lock = RunLock(tmp_path).acquire()
    lock.record()
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    lock.release()
    RunLock(tmp_path).acquire().release()


def test_checkpoint_rng_contract_covers_python_numpy_torch():
    state = ckpt.rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
