"""`polar prepare` on datatrove: tokenization as a datatrove pipeline of tasks, run by its local executor (``--workers
N`` processes) or as a SLURM job array (``--slurm``), then one merge that writes our shard format.

Task ``t`` of ``T`` reads a contiguous range of the dataset's units (files, a Hub dataset's shards:
tokenizer.sources.count_units), encodes each document followed by EOS and writes ``tasks/{t}.bin`` (tokens) and
``tasks/{t}.len`` (document lengths), each renamed into place when complete. datatrove records a finished task
(``logs/completions/``) and skips it when the same prepare is run again, so a killed or preempted prepare redoes
only its unfinished tasks. The merge reads the tasks in order, which is the documents' order, and writes the shards
exactly as one process reading the dataset front to back would: the output does not depend on the number of tasks
or workers, nor on where they ran. On a cluster (``--slurm``) the tasks are datatrove's SLURM job array (its
``SlurmPipelineExecutor``: one array task per tokenize task, requeued on preemption, completed tasks never
resubmitted) and the merge is one more job depending on the array (``afterok``) that reruns the same ``polar
prepare`` locally: it finds every task complete and only merges. The work folder ``.OUT.prepare/`` beside ``--out`` holds ``job.json`` (what is being prepared: another
job there is discarded, never mixed in) and is removed once the output is in place.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from datatrove.executor import SlurmPipelineExecutor

TASK_LOG = "logs"
SLURM_LOG = "slurm"  # the array's and the merge job's output files (kept with the work folder on failure)


def work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.prepare"


@dataclass(frozen=True)
class TokenizeTask:
    """The datatrove pipeline step (a callable ``(data, rank, world_size)``): tokenize this rank's units."""

    dataset: str
    text_field: str
    tokenizer: str
    dtype: str
    units: int
    batch_chars: int
    num_threads: int | None
    tasks_dir: str

    def unit_range(self, rank: int, world_size: int) -> range:
        return range(rank * self.units // world_size, (rank + 1) * self.units // world_size)

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        from pretrain.prepare import encode_documents
        from tokenizer.sources import iter_unit, parse_spec

        source, tok = parse_spec(self.dataset), _tokenizer(self.tokenizer)
        docs = (d for u in self.unit_range(rank, world_size) for d in iter_unit(source, u, self.text_field))
        final = Path(self.tasks_dir) / f"{rank:05d}"
        tmp = final.with_suffix(".partial")
        lengths = []
        with open(tmp.with_suffix(".bin"), "wb") as f:
            for tokens, lens in encode_documents(docs, tok, np.dtype(self.dtype), self.batch_chars, self.num_threads):
                f.write(tokens.tobytes())
                lengths.append(lens)
        np.concatenate(lengths or [np.zeros(0, np.int64)]).astype("<u8").tofile(tmp.with_suffix(".len"))
        os.replace(tmp.with_suffix(".bin"), final.with_suffix(".bin"))
        os.replace(tmp.with_suffix(".len"), final.with_suffix(".len"))
        return None


@functools.cache
def _tokenizer(ref: str):
    """One load per worker process, not per task: loading (an AutoTokenizer above all) costs more than a small task."""
    from tokenizer import load_tokenizer

    return load_tokenizer(ref)


def task_outputs(tasks_dir: Path, tasks: int, dtype: np.dtype):
    """Each task's (tokens, lengths), in task order (memory-mapped)."""
    for t in range(tasks):
        base = tasks_dir / f"{t:05d}"
        lengths = np.fromfile(base.with_suffix(".len"), dtype="<u8").astype(np.int64)
        size = base.with_suffix(".bin").stat().st_size
        tokens = np.memmap(base.with_suffix(".bin"), dtype=dtype, mode="r") if size else np.zeros(0, dtype)
        yield tokens, lengths


def start(out: Path, job: dict) -> Path:
    """The work folder for ``job``: reused when it holds the same job (a rerun), started afresh otherwise."""
    work = work_dir(out)
    record = work / "job.json"
    if work.exists() and (not record.is_file() or json.loads(record.read_text()) != job):
        shutil.rmtree(work)
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    if not record.is_file():
        record.write_text(json.dumps(job, indent=2) + "\n")
    return work


def run_local(step: TokenizeTask, tasks: int, workers: int, work: Path) -> list[int]:
    """Run the incomplete tasks with ``workers`` processes; returns the tasks skipped as already complete."""
    from datatrove.executor import LocalPipelineExecutor

    executor = LocalPipelineExecutor(pipeline=[step], tasks=tasks, workers=workers,
                                     logging_dir=str(work / TASK_LOG), start_method="fork")
    done = [t for t in range(tasks) if executor.is_rank_completed(t)]
    with _datatrove_output_to_log():
        executor.run()
    return done


@dataclass(frozen=True)
class SlurmOptions:
    """How the tokenize tasks and the merge are submitted (``polar prepare --slurm``)."""

    partition: str | None = None  # None: the cluster's default partition
    time: str = "24:00:00"  # per array task
    cpus_per_task: int = 4  # also the encoder threads of each task
    mem_per_cpu_gb: int | None = None  # None: the cluster's default
    qos: str | None = None
    requeue: bool = True  # a preempted or failed array task goes back to the queue
    max_parallel: int | None = None  # array tasks running at once (the array's %N); None: as many as fit


class PolarSlurmExecutor(SlurmPipelineExecutor):
    """datatrove's SLURM executor with two differences: unset directives (partition, qos) are left out of the
    script instead of written bare (memory too, when unset), and no stats-merging job is launched (the merge job
    reports what it wrote)."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        unset = {k for k, v in (("partition", self.partition), ("qos", self.qos),
                                ("mem-per-cpu", self.mem_per_cpu_gb)) if v is None}
        return {k: v for k, v in super().get_sbatch_args(max_array).items() if k not in unset}

    def launch_merge_stats(self):
        return None


def submit_slurm(step: TokenizeTask, tasks: int, work: Path, opts: SlurmOptions, merge_argv: list[str]
                 ) -> tuple[str | None, int, str]:
    """Submit the incomplete tokenize tasks as one SLURM job array and the merge as a job depending on it.
    Returns (array job id or None when every task was complete, tasks submitted, merge job id)."""
    executor = PolarSlurmExecutor(
        pipeline=[step], tasks=tasks, time=opts.time, partition=opts.partition, cpus_per_task=opts.cpus_per_task,
        mem_per_cpu_gb=opts.mem_per_cpu_gb, qos=opts.qos, requeue=opts.requeue,
        workers=opts.max_parallel or -1, job_name="polar-prepare", logging_dir=str(work / TASK_LOG),
        slurm_logs_folder=str(work / SLURM_LOG),
        env_command=f"export PATH={shlex.quote(str(Path(sys.executable).parent))}:$PATH",  # this environment's
    )
    todo = len(executor.get_incomplete_ranks())
    with _datatrove_output_to_log() as log:
        try:
            executor.run()
        except subprocess.CalledProcessError:  # sbatch's reason went to the log with datatrove's other lines
            reasons = [line.strip() for line in log.read_text().splitlines() if line.startswith("sbatch: error")]
            raise RuntimeError(f"sbatch refused the tokenize job array: {reasons[-1] if reasons else 'see ' + str(log)}"
                               "; fix the --partition/--time/--cpus-per-task/--mem-per-cpu-gb/--qos options") from None
    array = None if executor.job_id in (None, -1) else str(executor.job_id)
    directives = [f"--time={opts.time}", f"--cpus-per-task={opts.cpus_per_task}",
                  *([f"--mem-per-cpu={opts.mem_per_cpu_gb}G"] if opts.mem_per_cpu_gb else []),
                  *([f"--partition={opts.partition}"] if opts.partition else []),
                  *([f"--qos={opts.qos}"] if opts.qos else []), *([f"--dependency=afterok:{array}"] if array else [])]
    merge = subprocess.run(
        ["sbatch", "--parsable", "--job-name=polar-prepare-merge", f"--chdir={os.getcwd()}",
         f"--output={work / SLURM_LOG / 'merge-%j.out'}", *directives, "--wrap", shlex.join(merge_argv)],
        capture_output=True, text=True)
    if merge.returncode:
        raise RuntimeError(f"sbatch refused the merge job: {merge.stderr.strip()}")
    return array, todo, merge.stdout.strip().split(";")[0]


@contextlib.contextmanager
def _datatrove_output_to_log():
    """datatrove's per-task console lines are bookkeeping: they go to the log file ($POLAR_LOG), as the rest."""
    import sys

    from pretrain.console import log_file

    path = log_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield path
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def job_record(step: TokenizeTask, tasks: int, fingerprint: str) -> dict:
    """What the tasks' outputs depend on (not the thread count)."""
    return {**asdict(step), "num_threads": None, "tasks": tasks, "fingerprint": fingerprint}
