"""Checkpoints: DeepSpeed tags under ``RUN/checkpoints/``, per-rank RNG, ``latest``, keep-last-K, export.

Layout of one tag (``step_00000100/``): DeepSpeed's model/optimizer files (its ``client_state`` holds the
trainer's state: step, consumed_samples, tokens seen, ...), ``rng_rank{r}.pt`` for every rank (python,
numpy, torch, cuda), and ``polar_state.json`` (resolved config, tokenizer fingerprint, data manifest
hash) so compatibility is checked before anything is loaded. ``latest`` names the newest complete tag
and moves only after every rank has written; older tags beyond ``keep_last`` are pruned after that.
"""

from __future__ import annotations

import json
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

TAG_RE = re.compile(r"^step_(\d{8})$")
STATE_FILE = "polar_state.json"
UNIVERSAL_SUFFIX = "_universal"


class CheckpointError(ValueError):
    """A checkpoint cannot be used with this run; the message says why and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def list_tags(ckpt_dir: Path) -> list[str]:
    """Complete tags (those with our state file), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(tags)


def latest_tag(ckpt_dir: Path) -> str | None:
    f = ckpt_dir / "latest"
    return f.read_text().strip() if f.is_file() else None


def resolve_tag(ckpt_dir: Path, step: int | None = None) -> str:
    """The tag for ``step`` (default: ``latest``), with a clear error when it does not exist."""
    if step is None:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"no checkpoint in {ckpt_dir} (no 'latest' file): train first or pass --step")
    else:
        tag = tag_for(step)
    if not (ckpt_dir / tag / STATE_FILE).is_file():
        have = ", ".join(str(int(TAG_RE.match(t)[1])) for t in list_tags(ckpt_dir)) or "none"
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} not found (steps available: {have})")
    return tag


def read_state(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((ckpt_dir / tag / STATE_FILE).read_text())


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


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], meta: dict[str, Any],
         keep_last: int, rank: int) -> str:
    """Write tag ``step`` on every rank, then (rank 0) move ``latest`` and prune old tags."""
    barrier = torch.distributed.barrier
    tag = tag_for(step)
    # universal_checkpoint_info lets DeepSpeed's ds_to_universal convert the tag for a resize
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**client_state, "universal_checkpoint_info": {}},
                           save_latest=False)
    torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        atomic_write(ckpt_dir / tag / STATE_FILE, json.dumps({**meta, "step": step}, indent=2))
        atomic_write(ckpt_dir / "latest", tag)
        for old in list_tags(ckpt_dir)[:-keep_last]:
            if old != tag:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
                shutil.rmtree(ckpt_dir / f"{old}{UNIVERSAL_SUFFIX}", ignore_errors=True)
    barrier()
    return tag


def check_compatible(saved: dict[str, Any], meta: dict[str, Any], where: Path) -> None:
    """Refuse a resume whose model or tokenizer differs from the checkpoint's, or a ZeRO-3 resize
    (nothing is loaded yet)."""
    old_model, new_model = saved["config"]["model"], meta["config"]["model"]
    if old_model != new_model:
        diffs = _diff(old_model, new_model)
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


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "model.") -> str:
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out.append(_diff(a[k], b[k], f"{prefix}{k}."))
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}: {a.get(k)!r} in the checkpoint vs {b.get(k)!r} now")
    return "; ".join(x for x in out if x)


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
    _, client_state = engine.load_checkpoint(str(ckpt_dir), tag=load_tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
    if client_state is None:
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed could not load it (see the log above)")
    rng_file = ckpt_dir / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Full fp32 model weights from a tag, whatever the ZeRO stage (0: the saved module; 1-3: merged
    from the partitioned optimizer states by DeepSpeed's zero_to_fp32)."""
    stage = read_state(ckpt_dir, tag)["config"]["distributed"]["zero_stage"]
    if stage == 0:
        return torch.load(ckpt_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu",
                          weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
