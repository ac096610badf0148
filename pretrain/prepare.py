"""`polar prepare`: tokenize a dataset spec into train/val token shards plus a manifest (format: pretrain.data).

Tokenization runs as datatrove tasks (pretrain/prepare_engine.py): documents are read in batches and encoded with
the tokenizer's batch encoder, each followed by EOS. The merge streams the tasks' outputs, in document order, into
fixed-size shards while their sha256 is computed, with the ends of the documents beside each shard. Document ``i``
goes to ``val`` when ``ceil((i+1)*f) > ceil(i*f)``: an evenly spread, deterministic fraction ``f`` that works on
streams of unknown length and holds out at least one document (the first) whenever ``f > 0``.
Everything is written to a temporary directory next to ``--out`` and renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.data import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_DTYPE,
    MANIFEST,
    SPLITS,
    DataError,
    dtype_for_vocab,
    index_name,
    shard_name,
)


@dataclass(frozen=True)
class PrepareConfig:
    dataset: str
    tokenizer: str
    out: str
    val_fraction: float = 0.01
    num_proc: int | None = None  # encoder threads per worker; None = the usable cores / workers
    workers: int = 1  # processes running the tokenize tasks (datatrove's local executor)
    tasks: int = 64  # tokenize tasks (at most one per file / Hub shard); a rerun redoes only unfinished ones
    force: bool = False
    text_field: str = "text"
    shard_tokens: int = 1 << 28  # 512 MiB of uint16 per shard
    batch_chars: int = 1 << 23  # characters read per encode batch (bounds memory, keeps threads busy)

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1:
            raise DataError(f"--shard-tokens must be >= 1, got {self.shard_tokens}")
        if self.workers < 1 or self.tasks < 1:
            raise DataError(f"--workers and --tasks must be >= 1, got {self.workers} and {self.tasks}")


class ShardWriter:
    """Appends token arrays to ``{split}_{k}.bin`` files of exactly ``shard_tokens`` tokens (the last shorter), and
    beside each the ends of the documents that end in it (``{split}_{k}.idx``, pretrain/data.py)."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._file = None
        self._hash = None
        self._count = 0
        self._ends: list[np.ndarray] = []

    def _open_next(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._file = open(self.out / name, "wb")  # noqa: SIM115 - closed in _close
        self._hash = hashlib.sha256()
        self._count = 0
        self._max_id = -1
        self._ends = []
        self.shards.append({"file": name, "tokens": 0, "sha256": "", "max_id": -1})

    def _close(self) -> None:
        self._file.close()
        ends = np.concatenate(self._ends).astype(INDEX_DTYPE) if self._ends else np.zeros(0, INDEX_DTYPE)
        index = index_name(self.shards[-1]["file"])
        (self.out / index).write_bytes(ends.tobytes())
        # max_id lets the trainer refuse data a model's vocabulary cannot embed before it starts
        self.shards[-1].update(tokens=self._count, sha256=self._hash.hexdigest(), max_id=self._max_id,
                               index=index, document_ends=len(ends))
        self._file = None

    def write(self, tokens: np.ndarray, ends: np.ndarray) -> None:
        """Append whole documents: ``ends`` are their exclusive ends in ``tokens`` (ascending, the last
        ``len(tokens)``)."""
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                self._open_next()
            take = tokens[pos : pos + self.shard_tokens - self._count]
            data = take.tobytes()
            self._file.write(data)
            self._hash.update(data)
            lo, hi = np.searchsorted(ends, [pos, pos + len(take)], side="right")
            self._ends.append(ends[lo:hi] - pos + self._count)
            self._count += len(take)
            self._max_id = max(self._max_id, int(take.max()))
            pos += len(take)
            if self._count == self.shard_tokens:
                self._close()
        self.documents += len(ends)

    def finish(self) -> dict[str, Any]:
        if self._file is not None:
            self._close()
        return {
            "documents": self.documents,
            "tokens": sum(s["tokens"] for s in self.shards),
            "shards": self.shards,
        }


def _batches(docs, batch_chars: int):
    batch, size = [], 0
    for doc in docs:
        batch.append(doc)
        size += len(doc)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_documents(docs, tok, dtype: np.dtype, batch_chars: int, num_threads: int | None):
    """(tokens, lengths) per batch of ``docs``: each document's ids followed by EOS, concatenated."""
    for batch in _batches(docs, batch_chars):
        encoded = tok.encode_batch(batch, num_threads=num_threads)
        for ids in encoded:
            ids.append(tok.eos_id)
        lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
        yield np.fromiter(itertools.chain.from_iterable(encoded), dtype=dtype, count=int(lengths.sum())), lengths


def is_val(index, fraction: float):
    """Whether document ``index`` (an int or an array of them) is held out: ``ceil((i + 1) f) > ceil(i f)``."""
    return np.ceil((np.asarray(index) + 1) * fraction) > np.ceil(np.asarray(index) * fraction)


def write_documents(writers: dict[str, ShardWriter], tokens: np.ndarray, lengths: np.ndarray, first: int,
                    val_fraction: float) -> None:
    """Documents ``first, first + 1, ...`` (``tokens`` cut by ``lengths``) into the splits :func:`is_val` picks."""
    if not len(lengths):
        return
    ends = np.cumsum(lengths)
    starts = ends - lengths
    val = is_val(first + np.arange(len(lengths)), val_fraction)
    # Consecutive documents of one split are written with one call.
    bounds = [0, *(np.flatnonzero(np.diff(val)) + 1).tolist(), len(lengths)]
    for a, b in itertools.pairwise(bounds):
        writers["val" if val[a] else "train"].write(tokens[starts[a] : ends[b - 1]], ends[a:b] - starts[a])


def merge_tasks(tmp: Path, cfg: PrepareConfig, parts, dtype: np.dtype) -> dict[str, Any]:
    """Write the final shards from the tasks' outputs in task order (= the documents' order); ``parts`` yields
    each task's (tokens, lengths)."""
    from tqdm import tqdm

    writers = {split: ShardWriter(tmp, split, dtype, cfg.shard_tokens) for split in SPLITS}
    index = 0
    with tqdm(desc="merge", unit="tok", unit_scale=True, mininterval=1.0) as bar:
        for tokens, lengths in parts:
            write_documents(writers, tokens, lengths, index, cfg.val_fraction)
            index += len(lengths)
            bar.update(len(tokens))
    if index == 0:
        raise DataError(f"no documents in {cfg.dataset}: the input is empty (or every document is empty)")
    splits = {split: w.finish() for split, w in writers.items()}
    if splits["train"]["tokens"] == 0:
        raise DataError(
            f"{cfg.dataset} has {index} document(s), all held out for validation: lower --val-fraction "
            "(0 disables validation) or add documents"
        )
    return splits


@dataclass(frozen=True)
class PreparePlan:
    """A validated prepare: the tokenize step of every task, their count and the work folder."""

    out: Path
    step: Any  # prepare_engine.TokenizeTask
    tasks: int
    dtype: np.dtype
    tokenizer: Any
    work: Path


def plan(cfg: PrepareConfig, threads: int | None = None) -> PreparePlan:
    """Check everything (output, tokenizer, dataset) before anything is written."""
    from pretrain import prepare_engine as engine
    from tokenizer import load_tokenizer
    from tokenizer.sources import count_units, parse_spec
    from tokenizer.tokenizer import default_threads

    out = Path(cfg.out)
    if out.exists() and not cfg.force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it")
    threads = threads or cfg.num_proc or max(1, default_threads() // cfg.workers)
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))  # the ``tokenizers`` pool reads it once, at first use
    tok = load_tokenizer(cfg.tokenizer)
    if tok.eos_id < 0:
        raise DataError(f"tokenizer {cfg.tokenizer} has no EOS token to end documents with: give it an eos_token "
                        "(tokenizer_config.json) or train one with polar tokenizer train")
    dtype = dtype_for_vocab(tok.vocab_size)
    units = count_units(parse_spec(cfg.dataset))
    tasks = max(1, min(units, cfg.tasks))
    work = engine.work_dir(out)
    step = engine.TokenizeTask(cfg.dataset, cfg.text_field, str(cfg.tokenizer), dtype.str, units, cfg.batch_chars,
                               threads, str(work / "tasks"))
    return PreparePlan(out, step, tasks, dtype, tok, work)


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Tokenize ``cfg.dataset`` into ``cfg.out`` on datatrove's local executor (pretrain/prepare_engine.py), then
    merge; returns the manifest."""
    import shutil

    from pretrain import prepare_engine as engine
    from tokenizer.atomic import output_error

    p = plan(cfg)
    try:
        engine.start(p.out, engine.job_record(p.step, p.tasks, p.tokenizer.fingerprint))
        done = engine.run_local(p.step, p.tasks, cfg.workers, p.work)
        print(f"tokenized {p.tasks} task(s) on {cfg.workers} worker(s); {len(done)} were complete already")
        manifest = merge(cfg, p)
    except Exception as e:  # bad input fails again on a rerun: leave nothing behind (a kill leaves the tasks to resume)
        shutil.rmtree(p.work, ignore_errors=True)
        raise output_error(p.out, e)  # noqa: B904 - its cause is set there (or it is e itself)
    shutil.rmtree(p.work, ignore_errors=True)
    return manifest


def merge(cfg: PrepareConfig, p: PreparePlan) -> dict[str, Any]:
    """Write ``cfg.out`` (atomically) from the completed tasks of ``p``; returns the manifest."""
    import json

    from pretrain import prepare_engine as engine
    from tokenizer.atomic import write_atomically

    manifest: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        splits = merge_tasks(tmp, cfg, engine.task_outputs(p.work / "tasks", p.tasks, p.dtype), p.dtype)
        manifest.update(
            format=FORMAT,
            version=FORMAT_VERSION,
            source={"spec": cfg.dataset, "text_field": cfg.text_field, "val_fraction": cfg.val_fraction},
            tokenizer={"fingerprint": p.tokenizer.fingerprint, "vocab_size": p.tokenizer.vocab_size,
                       "path": str(cfg.tokenizer), "kind": p.tokenizer.kind},
            dtype=p.dtype.str,
            eos_id=p.tokenizer.eos_id,
            shard_tokens=cfg.shard_tokens,
            splits=splits,
        )
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    write_atomically(p.out, fill, cfg.force)
    return manifest


def submit(cfg: PrepareConfig, slurm) -> str:
    """``polar prepare --slurm``: the incomplete tokenize tasks as a SLURM job array, then a merge job depending on
    it that reruns this prepare locally (every task complete: it only merges). Returns what was submitted."""
    import shutil
    import sys

    from pretrain import prepare_engine as engine

    if shutil.which("sbatch") is None:
        raise DataError("--slurm needs SLURM's sbatch on PATH: run it on the cluster's login node, or drop --slurm to "
                        "tokenize here (--workers N)")
    if min(slurm.cpus_per_task, slurm.mem_per_cpu_gb or 1, slurm.max_parallel or 1) < 1:
        raise DataError("--cpus-per-task, --mem-per-cpu-gb and --max-parallel must be >= 1")
    p = plan(cfg, threads=slurm.cpus_per_task)
    engine.start(p.out, engine.job_record(p.step, p.tasks, p.tokenizer.fingerprint))
    # the same options verbatim (the merge job runs in this directory): the rerun must see the same job record
    argv = [sys.executable, "-m", "pretrain.cli", "prepare", "--dataset", cfg.dataset, "--tokenizer", str(cfg.tokenizer),
            "--out", str(cfg.out), "--val-fraction", repr(cfg.val_fraction), "--tasks", str(cfg.tasks),
            "--text-field", cfg.text_field, "--shard-tokens", str(cfg.shard_tokens), "--num-proc",
            str(slurm.cpus_per_task), *(["--force"] if cfg.force else [])]
    array, todo, merge_job = engine.submit_slurm(p.step, p.tasks, p.work, slurm, argv)
    tokenize = (f"tokenize job array {array}: {todo} of {p.tasks} task(s) (the rest were complete)" if array
                else f"all {p.tasks} tokenize task(s) were complete")
    return (f"submitted {tokenize}; merge job {merge_job} writes {p.out} when they succeed. Logs: "
            f"{p.work / engine.SLURM_LOG}; rerun the same command after a failure: it resubmits only unfinished "
            "tasks")
