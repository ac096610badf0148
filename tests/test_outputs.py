"""Every output is written the one way (tokenizer/atomic.py): a disk that fills up while a command writes its
result gives exit 2 and one stderr line naming the path, the free space and the fix, leaves no partial output
and the previous output byte-identical; `kill -9` at any instant leaves the output complete or absent, and the
next run removes what the dead one left; a refused command writes nothing; results are kept, not replaced."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.cli import main
from tests.fault_hooks import full_open
from tests.train_helpers import ROOT, ok, train, write_config
from tokenizer.atomic import HOST, OutputError, is_temporary, sibling, write_atomically, write_text

PROGRESS = re.compile(r"\[\d\d:\d\d[<,]")  # a tqdm progress bar's elapsed time
RECENCY = "--data builtin --context 16 --target 4 --windows 2 --positions 2 --batch-size 2 --sizes 1/4"


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (folders too) with its content's hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if is_temporary(p.relative_to(root))]


def fill_the_disk(monkeypatch) -> None:
    """The disk fills up while the new output is being built (tests/fault_hooks.py, in this process)."""
    full = full_open(io.open)
    monkeypatch.setattr(builtins, "open", full)
    monkeypatch.setattr(io, "open", full)


@pytest.fixture
def disk_full(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    fill_the_disk(monkeypatch)


def refused(capsys, argv: list[str], *fragments: str) -> str:
    """`polar ARGV` exits 2 with exactly one stderr line holding every fragment (besides progress bars)."""
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if not PROGRESS.search(line)]
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def polar(*args: str, disk_full: bool = False) -> subprocess.CompletedProcess:
    """`polar ARGS` in a fresh process; ``disk_full``: on a full disk (tests/fault_hooks.py as a plugin)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           **({"POLAR_PLUGINS": "tests.fault_hooks", "POLAR_FAULT_DISK_FULL": "1"} if disk_full else {})}
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def one_line(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-3000:])
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# -- the mechanism ------------------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_previous_output_and_says_what_to_do(tmp_path):
    out = tmp_path / "out"
    write_atomically(out, lambda t: (t / "a").write_text("old"))
    before = snapshot(tmp_path)

    def fill(t: Path) -> None:
        (t / "b").write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(t / "b"))

    with pytest.raises(OutputError) as e:
        write_atomically(out, fill)
    message = str(e.value)
    assert "\n" not in message and f"writing {out} failed: No space left on device" in message
    assert "GiB free on" in message and "free space on it or write elsewhere" in message
    assert snapshot(tmp_path) == before
    for code, fix in ((errno.EACCES, "fix the permissions"), (errno.EROFS, "read-only")):
        with pytest.raises(OutputError, match=fix) as e:
            write_atomically(out, lambda t, code=code: (_ for _ in ()).throw(OSError(code, os.strerror(code))))
        assert "GiB free" not in str(e.value)  # free space only where it is the cause
    with pytest.raises(FileNotFoundError):  # not a write failure: passes unchanged
        write_atomically(out, lambda t: open(tmp_path / "missing"))
    assert snapshot(tmp_path) == before


def test_temporaries_of_dead_processes_are_removed_by_the_next_write(tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "result.json"
    stale = [sibling(out, "tmp", dead.pid), sibling(out, "tmp", 1)]  # dead, and older than the live pid 1
    for p in stale:
        p.write_text("{")
    os.utime(stale[1], (0, 0))
    live = sibling(out, "tmp", os.getppid())  # a live writer's
    live.write_text("{")
    elsewhere = tmp_path / sibling(out, "tmp", dead.pid).name.replace(HOST, "0" * 6)  # another host's pid
    elsewhere.write_text("{")
    other = sibling(tmp_path / "niah_1.json", "tmp", dead.pid)  # a result of another name (a timestamped one)
    other.write_text("{")
    with caplog.at_level(logging.WARNING):
        write_text(out, "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, elsewhere.name])
    assert {r.getMessage() for r in caplog.records} == {f"removed {p}, left by a dead process (pid {pid})" for p, pid
                                                        in ((stale[0], dead.pid), (stale[1], 1), (other, dead.pid))}


def test_a_folder_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "export"
    write_atomically(out, lambda t: (t / "w").write_text("old"))
    os.replace(out, sibling(out, "old", dead.pid))  # killed between moving the old folder aside and the rename
    with pytest.raises(FileExistsError):  # the next write of it finds the old folder back in place
        write_atomically(out, lambda t: (t / "w").write_text("new"), force=False)
    assert (out / "w").read_text() == "old"
    assert not temporaries(tmp_path)


def test_readers_ignore_temporary_results(tmp_path):
    from eval.results import read_step_results, stamp, write_json

    step_dir = tmp_path / "eval" / "step-5"
    write_json(step_dir / "niah_1.json", stamp({"cells": []}, "niah", [], "run", 5))
    sibling(step_dir / "niah_2.json").write_text(json.dumps(stamp({"cells": []}, "niah", [], "run", 5)))
    assert [r["file"] for r in read_step_results(step_dir, 5)["niah"]] == ["niah_1.json"]


def test_rust_writers_io_errors_are_write_failures(tmp_path, monkeypatch):
    """safetensors (and tokenizers) raise a full disk as their own exception: "... (os error 28)"."""
    from safetensors import SafetensorError

    import models.hf
    from models import MambaLM, ModelConfig

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(models.hf, "save_file", full)
    model = MambaLM(ModelConfig.preset("mamba-tiny", d_model=16, n_layer=1, vocab_size=64))
    with pytest.raises(OutputError, match="No space left on device .*GiB free") as e:
        write_atomically(tmp_path / "export", lambda t: models.hf.save_pretrained(model, t))
    assert e.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())
    with pytest.raises(SafetensorError):  # not an I/O failure: unchanged
        write_atomically(tmp_path / "export", lambda t: (_ for _ in ()).throw(SafetensorError("bad dtype")))


# -- disk full, per writer ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    """A 4-step run with checkpoints at 2 and 4 (baseline Mamba, so it can be published)."""
    base = tmp_path_factory.mktemp("outputs")
    cfg = write_config(base, data, schedule={"steps": 4}, checkpoint={"every": 2},
                       distributed={"zero_stage": 0}, model={"preset": "mamba-tiny"})
    ok(train(cfg))
    return base / "runs" / "run"


@pytest.fixture
def world(run, tmp_path) -> Path:
    """A private copy of the run, in a folder of its own."""
    shutil.copytree(run, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


@pytest.mark.slow
def test_disk_full_tokenizer_and_prepare(data, tmp_path):
    """In fresh processes, the disk filled by the fault plugin (datatrove's workers write to the console)."""
    shutil.copytree(data["tokenizer"], tmp_path / "tok")
    shutil.copytree(data["path"], tmp_path / "data")
    before = snapshot(tmp_path)
    spec = ["--dataset", "builtin:shakespeare"]
    one_line(polar("tokenizer", "train", *spec, "--vocab-size", "512", "--out", str(tmp_path / "tok"), "--force",
                   disk_full=True), f"writing {tmp_path / 'tok'} failed: No space left on device", "GiB free",
             "write elsewhere")
    one_line(polar("prepare", *spec, "--tokenizer", data["tokenizer"], "--out", str(tmp_path / "data"), "--force",
                   disk_full=True), f"writing {tmp_path / 'data'} failed: No space left on device", "GiB free",
             "write elsewhere")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_disk_full_export_publish_eval_sweep_diagnose(world, tmp_path, capsys, monkeypatch):
    """Each writer once for real, then again onto a full disk."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    outs = {"export": tmp_path / "export", "publish": world / "hub" / "step-4", "diagnose": tmp_path / "diag"}
    commands = {
        "export": ["export", str(world), "--out", str(outs["export"]), "--force"],
        "publish": ["publish", str(world), "--repo-id", "me/tiny", "--dry-run", "--force"],
        "eval": ["eval", "recency", str(world), *RECENCY.split()],
        "sweep": ["eval", "sweep", str(world), "--recency", RECENCY, "--out", str(tmp_path / "sweep")],
        "diagnose": ["diagnose", str(world), "--out", str(outs["diagnose"]), "--batch", "1", "--seq-len", "8",
                     "--force"],
    }
    for argv in commands.values():
        assert main(argv) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    with pytest.MonkeyPatch.context() as m:
        fill_the_disk(m)
        for name, argv in commands.items():
            line = refused(capsys, argv, "failed: No space left on device", "GiB free", "then run again")
            assert str(outs.get(name, tmp_path)) in line, line
    assert snapshot(tmp_path) == before


def test_disk_full_mqar_scores_and_study_tables(tmp_path, disk_full):
    from eval.mqar import MQARDataConfig, write_scores
    from eval.results import write_files

    with pytest.raises(OutputError, match=f"writing {tmp_path} failed: No space left on device"):
        write_scores({"average": 0.5}, tmp_path, MQARDataConfig())
    with pytest.raises(OutputError, match="GiB free"):
        write_files({tmp_path / "study.md": lambda p: p.write_text("|"), tmp_path / "study.png": lambda p: None})
    assert not list(tmp_path.iterdir())


# -- refused before anything is written ---------------------------------------------------------------------
def test_publish_refuses_a_malformed_repo_id_before_writing(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    refused(capsys, ["publish", str(tmp_path / "run"), "--repo-id", "not a repo", "--dry-run"],
            "--repo-id 'not a repo' is not a Hub repo id", "NAMESPACE/NAME")
    assert [p.name for p in tmp_path.rglob("*")] == ["run"]


@pytest.mark.slow
def test_a_refused_train_leaves_no_run_folder(data, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = write_config(tmp_path, {**data, "path": str(tmp_path / "empty")})
    proc = polar("train", str(cfg))
    assert proc.returncode == 2 and "manifest.json" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


# -- kill -9 ------------------------------------------------------------------------------------------------
def _killed_at(args: list[str], watch: Path, delay: float) -> bool:
    """`polar ARGS`, SIGKILLed ``delay`` seconds after a temporary sibling first shows under ``watch`` (unless
    it ended first); True when it was killed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "pretrain.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and not (watch.exists() and temporaries(watch)) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def _valid_prepare(out: Path) -> None:
    from pretrain.data import TokenShards

    TokenShards(out, "train", verify_checksums=True)


def _valid_export(out: Path) -> None:
    from models.hf import from_pretrained

    from_pretrained(out)


def _valid_publish(out: Path) -> None:
    from pretrain.publish import verify_folder

    verify_folder(out)


def _valid_sweep(out: Path) -> None:
    assert "recency/clean_loss" in (out / "sweep.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prepare", "export", "publish", "sweep"])
def test_kill_9_leaves_the_output_complete_or_absent(command, data, world, tmp_path):
    out = {"prepare": tmp_path / "data", "export": tmp_path / "export", "publish": tmp_path / "hub",
           "sweep": tmp_path / "sweep"}[command]
    args = {"prepare": ["prepare", "--dataset", "builtin:shakespeare", "--tokenizer", data["tokenizer"], "--out",
                        str(out), "--force"],
            "export": ["export", str(world), "--out", str(out), "--force"],
            "publish": ["publish", str(world), "--repo-id", "me/tiny", "--dry-run", "--out", str(out), "--force"],
            "sweep": ["eval", "sweep", str(world), "--recency", RECENCY, "--out", str(out)]}[command]
    valid = {"prepare": _valid_prepare, "export": _valid_export, "publish": _valid_publish,
             "sweep": _valid_sweep}[command]
    killed = []
    for delay in (0.0, 0.05, 0.5):
        killed.append(_killed_at(args, tmp_path, delay))
        if out.exists():
            valid(out)
        for result in (world / "eval").rglob("*.json") if (world / "eval").is_dir() else []:
            if not is_temporary(result.relative_to(world)):
                json.loads(result.read_text())  # every result the sweep kept is whole
    assert killed[0], "the command ended before it could be killed while writing"
    stale = temporaries(tmp_path)
    rerun = polar(*args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert all(f"removed {p}, left by a dead process" in rerun.stderr for p in stale if p.parent == out.parent)
    valid(out)
    assert not temporaries(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")]  # prepare's work folder too
