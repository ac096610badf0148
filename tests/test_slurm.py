"""SLURM launch on a real SLURM 22.05 cluster started by the fixture (two emulated nodes on loopback):
multi-node training through the real train.sbatch, preemption + requeue + resume, rendering."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain import checkpoint as ckpt
from pretrain.metrics import read_jsonl
from tests.slurm_cluster import SlurmCluster, missing_tools
from tests.train_helpers import ROOT, write_config


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_tools()
    if missing:
        message = f"SLURM is not installed ({', '.join(missing)} missing): .ci/run installs slurmctld slurmd " \
                  "slurm-client munge with apt-get"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI must run these, never skip them
        pytest.skip(message)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield c.start()
    finally:
        c.stop()


def polar(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**(env or os.environ), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def submit(cluster: SlurmCluster, config: Path) -> str:
    out = polar("launch", "slurm", str(config), "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "2",
                "--submit", env=cluster.env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()[-1]


def wait_for(cluster: SlurmCluster, job: str, states: set[str], timeout: float = 300) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        state = cluster.job_state(job)
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} still {cluster.job_state(job)} after {timeout}s\n{cluster.logs()}")


def job_log(run_dir: Path, job: str) -> str:
    return (run_dir / "logs" / f"slurm-{job}.out").read_text()


@pytest.mark.slurm
@pytest.mark.slow
def test_train_sbatch_runs_two_nodes_by_two_processes(cluster, tmp_path, data):
    cfg = write_config(tmp_path, data, schedule={"steps": 6}, data={"micro_batch_size": 2})
    job = submit(cluster, cfg)
    assert wait_for(cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", cluster.logs()
    run_dir = tmp_path / "runs" / "run"
    log = job_log(run_dir, job)
    assert "world 4" in log, log[-3000:]
    assert "node n1 (rank 0)" in log and "node n2 (rank 1)" in log
    assert ckpt.latest_tag(run_dir / "checkpoints") == "step_00000006"


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_checkpoints_requeues_and_resumes(cluster, tmp_path, data):
    steps = 60
    cfg = write_config(tmp_path, data, schedule={"steps": steps}, data={"micro_batch_size": 2},
                       checkpoint={"every": 1000})
    job = submit(cluster, cfg)
    run_dir = tmp_path / "runs" / "run"
    end = time.monotonic() + 300
    while len(read_jsonl(run_dir / "metrics.jsonl")) < 3:  # mid-run
        assert time.monotonic() < end and cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", job)  # what --signal=USR1@grace does before a time limit
    assert wait_for(cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400) == "COMPLETED", cluster.logs()
    log = job_log(run_dir, job)
    assert "run state preempted" in log and "requeueing job" in log, log[-4000:]
    assert "resumed from" in log and "run state finished" in log
    train = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert train == list(range(1, steps + 1))  # every step exactly once across the two runs


def test_dry_run_renders_a_valid_script(tmp_path, data):
    cfg = write_config(tmp_path, data)
    out = polar("launch", "slurm", str(cfg), "--nodes", "4", "--gpus-per-node", "8", "--time", "02:00:00",
                "--partition", "gpu", "--account", "lab", "--optim.lr", "1e-3")
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for directive in ("--nodes=4", "--gpus-per-node=8", "--time=02:00:00", "--partition=gpu", "--account=lab",
                      "--requeue", "--signal=USR1@"):
        assert f"#SBATCH {directive}" in script
    assert f"export CONFIG={cfg}" in script and "--optim.lr 1e-3" in script and "NPROC_PER_NODE=8" in script
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_launch_validates_before_anything_runs(tmp_path, data):
    cfg = write_config(tmp_path, data)
    for launcher in (["slurm", str(cfg), "--submit"], ["local", str(cfg), "--nproc-per-node", "2"]):
        out = polar("launch", *launcher, "--optim.lrr", "1")
        assert out.returncode == 2 and "did you mean 'lr'" in out.stderr and not out.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_launch_local_runs_torchrun(tmp_path, data):
    cfg = write_config(tmp_path, data, schedule={"steps": 2})
    out = polar("launch", "local", str(cfg), "--nproc-per-node", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "world 2" in out.stdout


@pytest.mark.slow
@pytest.mark.slurm
def test_prepare_on_slurm_redoes_only_unfinished_tasks_and_matches_a_local_prepare(tmp_path, cluster, data, rng):
    """`polar prepare --slurm` after a prepare that finished one of its three tasks: the job array holds only the
    other two, the merge job (afterok on the array) writes the output, and it is byte-identical to a local
    prepare of the same data; no work folder is left."""
    from datatrove.executor import LocalPipelineExecutor

    from pretrain import prepare_engine as engine
    from pretrain.prepare import PrepareConfig, plan
    from tests.data_helpers import dir_digest, random_docs, write_jsonl

    docs = random_docs(rng, 45)
    for k in range(3):
        write_jsonl(tmp_path / f"part{k}.jsonl", docs[k::3])
    spec, local, remote = str(tmp_path / "part*.jsonl"), tmp_path / "local", tmp_path / "remote"
    common = ["--dataset", spec, "--tokenizer", data["tokenizer"], "--tasks", "3", "--val-fraction", "0.1"]
    assert polar("prepare", *common, "--out", str(local)).returncode == 0
    p = plan(PrepareConfig(spec, data["tokenizer"], str(remote), tasks=3))  # a first prepare that did task 1 only
    engine.start(p.out, engine.job_record(p.step, p.tasks, p.tokenizer.fingerprint))
    p.step(None, 1, p.tasks)
    LocalPipelineExecutor(pipeline=[p.step], tasks=p.tasks, logging_dir=str(p.work / "logs")).mark_rank_as_completed(1)
    out = polar("prepare", *common, "--out", str(remote), "--slurm", "--cpus-per-task", "1", "--time", "00:10:00",
                env=cluster.env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 of 3 task(s)" in out.stdout, out.stdout
    merge = out.stdout.split("merge job ")[1].split()[0]
    state = wait_for(cluster, merge, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
    assert state == "COMPLETED", f"{state}\n{cluster.logs()}\n" + "\n".join(
        f.read_text() for f in (p.work / "slurm").glob("*.out")) if p.work.exists() else state
    assert dir_digest(remote) == dir_digest(local)
    assert not p.work.exists()
