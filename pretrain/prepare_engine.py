"""`polar prepare` on datatrove: tokenization as a datatrove pipeline of tasks, run by its local executor (``--workers
N`` processes) or as a SLURM job array (``--slurm``), then one merge that writes our shard format.

Task ``t`` of ``T`` reads a contiguous range of the dataset's units (files, a Hub dataset's shards:
tokenizer.sources.count_units), encodes each document followed by EOS and writes ``tasks/{t}.bin`` (tokens) and
``tasks/{t}.len`` (document lengths), each renamed into place when complete. datatrove records a finished task
(``logs/completions/``) and skips it when the same prepare is run again, so a killed or preempted prepare redoes
only its unfinished tasks. The merge reads the tasks in order, which is the documents' order, and writes the shards
exactly as one process reading the dataset front to back would: the output does not depend on the number of tasks
or workers. The work folder ``.OUT.prepare/`` beside ``--out`` holds ``job.json`` (what is being prepared: another
job there is discarded, never mixed in) and is removed once the output is in place.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TASK_LOG = "logs"


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
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def job_record(step: TokenizeTask, tasks: int, fingerprint: str) -> dict:
    """What the tasks' outputs depend on (not the thread count)."""
    return {**asdict(step), "num_threads": None, "tasks": tasks, "fingerprint": fingerprint}
