"""Checkpoints: DeepSpeed tags under ``RUN/checkpoints/``, per-rank RNG, ``latest``, rotation, export.

Layout of one tag (``step_00000100/``): DeepSpeed's model/optimizer files (its ``client_state`` holds the
trainer's state: step, consumed_samples, tokens seen, ...), ``rng_rank{r}.pt`` for every rank (python,
numpy, torch, cuda), and ``polar_state.json`` (resolved config, tokenizer fingerprint, data manifest
hash, and the tag's place in the run's history: ``seq``, ``parent``, ``ancestors``) so compatibility is
checked before anything is loaded.

Written the way a database commits (docs/training.md, "Crash safety"): every rank writes into
``step_X.partial/`` and fsyncs its files; rank 0 adds ``polar_state.json``, renames the folder into place,
fsyncs the directory, then replaces ``latest`` (fsynced) and rotates. A tag folder without the ``.partial``
suffix is therefore complete, and ``latest`` never names data that has not reached the disk. A save that
fails (ENOSPC, EACCES, ...) removes its partial folder and leaves the previous tags and ``latest`` as they
were. :class:`Checkpointer` is the trainer's handle on all this: it tracks the lineage and the tag a job
resumed from.

Rotation keeps the ``keep_last`` most recently written tags of the current lineage (the tags this run
descends from, not simply the highest step numbers: a run resumed from an older tag must not lose its new
checkpoints to the abandoned ones), never the tag being resumed from, and leaves other lineages alone.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.config import ModelConfig
from models.typed_config import differences
from pretrain.console import import_deepspeed, output_to_log
from tokenizer.atomic import fsync_dir, fsync_tree
from tokenizer.atomic import write_text as atomic_write  # the one output mechanism (tokenizer/atomic.py)

TAG_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "polar_state.json"
UNIVERSAL_SUFFIX = "_universal"
PARTIAL_SUFFIX = ".partial"  # a tag being written; never read
REPLACED_SUFFIX = ".replaced"  # a complete tag being superseded by a new save of the same step

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint cannot be used with this run; the message says why and what to do."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous one and ``latest`` are untouched."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    return int(TAG_RE.match(tag)[1])


def read_state(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    path = ckpt_dir / tag / STATE_FILE
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is corrupt ({e.msg}): resume or load another step") from e


def _order(ckpt_dir: Path, tag: str) -> tuple[int, int]:
    """Write order: the tag's ``seq`` (tags from before seq existed sort first, by step)."""
    return read_state(ckpt_dir, tag).get("seq", -1), step_of(tag)


def list_tags(ckpt_dir: Path) -> list[str]:
    """Complete tags, oldest written first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(tags, key=lambda t: _order(ckpt_dir, t))


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by ``latest``, as written (it may be missing on disk: see :func:`resume_tag`)."""
    f = ckpt_dir / "latest"
    return f.read_text().strip() or None if f.is_file() else None


def resume_tag(ckpt_dir: Path) -> str | None:
    """The tag to resume from: ``latest`` when complete, else the newest complete tag (said in one line)."""
    named, tags = latest_tag(ckpt_dir), list_tags(ckpt_dir)
    if named in tags or (named is None and not tags):
        return named
    if not tags:
        log.warning("%s names %s, which is missing or incomplete, and no complete checkpoint is left: "
                    "starting from step 0", ckpt_dir / "latest", named)
        return None
    log.warning("%s names %s, which is missing or incomplete: resuming from %s, the newest complete checkpoint",
                ckpt_dir / "latest", named, tags[-1])
    return tags[-1]


def resolve_tag(ckpt_dir: Path, step: int | None = None) -> str:
    """The tag for ``step`` (default: the one to resume from), with a clear error when it does not exist."""
    if step is None:
        tag = resume_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: train first or pass --step")
    else:
        tag = tag_for(step)
    if not (ckpt_dir / tag / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} not found (steps available: {available_steps(ckpt_dir)})")
    return tag


def available_steps(ckpt_dir: Path, but: str | None = None) -> str:
    """``"100, 200"``: the steps of the complete tags (except ``but``), for error messages."""
    return ", ".join(str(step_of(t)) for t in sorted(list_tags(ckpt_dir), key=step_of) if t != but) or "none"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _agree_failed(failed: bool) -> bool:
    """True on every rank when any rank failed."""
    if not torch.distributed.is_initialized():
        return failed
    t = torch.tensor([float(failed)])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def _save_error(ckpt_dir: Path, tag: str, error: OSError | None) -> CheckpointSaveError:
    free = shutil.disk_usage(ckpt_dir).free / 2**30 if ckpt_dir.exists() else float("nan")
    cause = f"{error.strerror or error} ({error.filename or ckpt_dir})" if error else "another rank failed to write"
    return CheckpointSaveError(
        f"saving checkpoint {ckpt_dir / tag} failed: {cause}; {free:.2f} GiB free on {ckpt_dir}: "
        f"free space or fix permissions, then run again to resume from {latest_tag(ckpt_dir) or 'the start'}"
    )


def lineage(ckpt_dir: Path, parent: str | None) -> list[str]:
    """The tags a save descending from ``parent`` descends from (``parent``'s ancestors, then ``parent``)."""
    if parent is None:
        return []
    state = read_state(ckpt_dir, parent)
    # tags written before ancestry was recorded: every older step counts as an ancestor
    ancestors = state.get("ancestors", [t for t in list_tags(ckpt_dir) if step_of(t) < step_of(parent)])
    return [*ancestors, parent]


def rotate(ckpt_dir: Path, tag: str, keep_last: int, protect: str | None) -> list[str]:
    """Delete the current lineage's tags beyond the ``keep_last`` most recently written (never ``tag`` or
    ``protect``); returns the deleted tags."""
    family = set(read_state(ckpt_dir, tag).get("ancestors", [])) | {tag}
    ours = [t for t in list_tags(ckpt_dir) if t in family]
    doomed = [t for t in ours[:-keep_last] if t not in (tag, protect)]
    for old in doomed:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        shutil.rmtree(ckpt_dir / f"{old}{UNIVERSAL_SUFFIX}", ignore_errors=True)
    return doomed


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], meta: dict[str, Any],
         keep_last: int, rank: int, parent: str | None = None, protect: str | None = None) -> str:
    """Write tag ``step`` on every rank (crash-safe, see the module docstring), then (rank 0) move
    ``latest`` and rotate. ``parent``: the tag this run resumed from or last saved (the lineage);
    ``protect``: the tag this job resumed from (never rotated away)."""
    tag = tag_for(step)
    partial = ckpt_dir / f"{tag}{PARTIAL_SUFFIX}"
    error: OSError | None = None
    try:
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash
        torch.distributed.barrier()
        # universal_checkpoint_info lets DeepSpeed's ds_to_universal convert the tag for a resize
        engine.save_checkpoint(str(ckpt_dir), tag=partial.name,
                               client_state={**client_state, "universal_checkpoint_info": {}}, save_latest=False)
        torch.save(rng_state(), partial / f"rng_rank{rank}.pt")
        fsync_tree(partial)
    except OSError as e:
        error = e
    if not _agree_failed(error is not None) and rank == 0:
        try:
            _commit(ckpt_dir, tag, partial, meta, step, parent)
        except OSError as e:
            error = e
    if _agree_failed(error is not None):
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        torch.distributed.barrier()
        raise _save_error(ckpt_dir, tag, error)
    if rank == 0:
        rotate(ckpt_dir, tag, keep_last, protect)
    torch.distributed.barrier()
    return tag


def _commit(ckpt_dir: Path, tag: str, partial: Path, meta: dict[str, Any], step: int, parent: str | None) -> None:
    """Rank 0: state file, rename into place, ``latest`` — each durable before the next."""
    tags = list_tags(ckpt_dir)
    seq = max((_order(ckpt_dir, t)[0] for t in tags), default=-1) + 1
    state = {**meta, "step": step, "seq": seq, "parent": parent, "ancestors": lineage(ckpt_dir, parent)}
    atomic_write(partial / STATE_FILE, json.dumps(state, indent=2))
    final, replaced = ckpt_dir / tag, ckpt_dir / f"{tag}{REPLACED_SUFFIX}"
    if final.exists():  # a complete tag of the same step (another lineage): never overwrite it in place
        shutil.rmtree(replaced, ignore_errors=True)
        os.replace(final, replaced)
    os.replace(partial, final)
    fsync_dir(ckpt_dir)
    atomic_write(ckpt_dir / "latest", tag)
    shutil.rmtree(replaced, ignore_errors=True)


class Checkpointer:
    """One rank's handle on a run's ``checkpoints/``: loads the tag a job resumes from, and saves new tags
    through the commit protocol (:func:`save`) with the lineage filled in (each save's parent is the tag
    loaded or saved before it) and rotation to ``keep_last`` that never removes the tag this job resumed
    from."""

    def __init__(self, ckpt_dir: Path, rank: int, keep_last: int):
        self.dir, self.rank, self.keep_last = ckpt_dir, rank, keep_last
        self.resumed_from: str | None = None  # protected from rotation for the life of the job
        self.last_tag: str | None = None  # the parent of the next save

    def resume_tag(self) -> str | None:
        return resume_tag(self.dir)

    def latest(self) -> str | None:
        return latest_tag(self.dir)

    def load(self, engine, tag: str, universal: bool = False) -> dict[str, Any]:
        """Load ``tag`` into ``engine`` (see :func:`load`); it becomes the resume point and the lineage's head."""
        client_state = load(engine, self.dir, tag, self.rank, universal)
        self.resumed_from = self.last_tag = tag
        return client_state

    def holds(self, step: int) -> bool:
        """True when this job already loaded or saved ``step``'s tag (nothing new to write)."""
        return self.last_tag == tag_for(step)

    def save(self, engine, step: int, client_state: dict[str, Any], meta: dict[str, Any]) -> str:
        """Commit tag ``step`` on every rank (raises :class:`CheckpointSaveError`, changing nothing, on failure)."""
        self.last_tag = save(engine, self.dir, step, client_state, meta, self.keep_last, self.rank,
                             parent=self.last_tag, protect=self.resumed_from)
        return self.last_tag


def check_compatible(saved: dict[str, Any], meta: dict[str, Any], where: Path) -> None:
    """Refuse a resume whose model or tokenizer differs from the checkpoint's, or a ZeRO-3 resize
    (nothing is loaded yet)."""
    # saved configs are compared in today's layout (an older layout of the same model is the same model)
    old_model, new_model = ModelConfig.from_dict(saved["config"]["model"]).to_dict(), meta["config"]["model"]
    if old_model != new_model:
        diffs = "; ".join(f"{k}: {a!r} in the checkpoint vs {b!r} now"
                          for k, a, b in differences(old_model, new_model, "model."))
        raise CheckpointError(
            f"{where} was trained with a different model config ({diffs}): restore the original model "
            f"settings or start a new run (run.name)"
        )
    stage = meta["config"]["distributed"]["zero_stage"]
    if stage == 3 and saved.get("world_size") != meta.get("world_size"):
        raise CheckpointError(
            f"{where} is a ZeRO-3 checkpoint of {saved.get('world_size')} processes and ZeRO-3 reloads only at "
            f"the same size: resume with {saved.get('world_size')} processes, or convert it with DeepSpeed's "
            f"ds_to_universal and load that"
        )
    if saved.get("tokenizer_fingerprint") != meta.get("tokenizer_fingerprint"):
        raise CheckpointError(
            f"{where} was trained with tokenizer {saved.get('tokenizer_fingerprint')}, the data now has "
            f"{meta.get('tokenizer_fingerprint')}: use the original data/tokenizer or start a new run (run.name)"
        )


def universal_tag(ckpt_dir: Path, tag: str, rank: int) -> str:
    """Convert ``tag`` to DeepSpeed's universal format (once, on rank 0) so ZeRO-1/2 partitions of the
    model and optimizer reload under another world size; returns the converted tag."""
    out = f"{tag}{UNIVERSAL_SUFFIX}"
    if rank == 0 and not (ckpt_dir / out).is_dir():
        tmp = ckpt_dir / f".{out}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               str(ckpt_dir / tag), "--output_folder", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"converting {ckpt_dir / tag} for a new world size failed: {proc.stderr[-500:]}")
        os.replace(tmp, ckpt_dir / out)
    torch.distributed.barrier()
    return out


def load(engine, ckpt_dir: Path, tag: str, rank: int, universal: bool = False) -> dict[str, Any]:
    """Load tag into ``engine``; restore this rank's RNG (fresh ranks after a resize keep their seed).
    With ``universal`` the engine was built with ``checkpoint.load_universal`` for a world-size change."""
    load_tag = universal_tag(ckpt_dir, tag, rank) if universal else tag
    try:
        _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
        rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
    except Exception as e:  # a truncated or damaged file: DeepSpeed and torch raise many kinds
        raise unreadable(ckpt_dir, tag, e) from e
    if client_state is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load it (see the log above)")
    return client_state


def unreadable(ckpt_dir: Path, tag: str, error: BaseException) -> CheckpointError:
    """The one-line error for a tag whose files cannot be read, naming the steps that still exist."""
    what = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return CheckpointError(
        f"checkpoint {ckpt_dir / tag} is truncated or corrupt ({what}): load another step with --step N "
        f"(steps available: {available_steps(ckpt_dir, but=tag)}), or move it aside to resume from the one before"
    )


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a tag, whatever the ZeRO stage (0: the saved module; 1-3: merged
    from the partitioned optimizer states by DeepSpeed's zero_to_fp32)."""
    stage = read_state(ckpt_dir, tag)["config"]["distributed"]["zero_stage"]
    if stage:
        import_deepspeed()
    try:
        if stage == 0:
            return torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                              weights_only=False)["module"]
        with output_to_log("deepspeed"):  # zero_to_fp32 prints its progress, and a progress bar
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except Exception as e:  # a truncated or damaged file: torch and DeepSpeed raise many kinds
        raise unreadable(ckpt_dir, tag, e) from e
