"""Where evaluation results are kept and how they are found again: the checkpoint's eval folder
(``RUN/eval/step-N/``, or ``EXPORT/eval/``) under timestamped names, ``KIND_<time>.json``, as lm-eval names
its result files, so a later evaluation never overwrites an earlier one. Every result file records the
evaluation kind that produced it (``evaluation``), the settings as typed (``options``), the checkpoint,
its step and the time; the model card reads a step's results back with :func:`read_step_results`."""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)


def timestamp() -> str:
    """lm-eval's result-file stamp (``lm_2026-12-01T14-36-48.164898.json``), to the microsecond."""
    return datetime.now().isoformat().replace(":", "-")


def resolved_step(checkpoint: str | Path, step: int | None) -> int | None:
    """The checkpoint step a model reference means (the latest unless ``step``); None for an export or Hub id."""
    from pretrain import checkpoint as ckpt
    from pretrain.export import checkpoint_location

    loc = checkpoint_location(checkpoint, step) if Path(checkpoint).exists() else None
    return None if loc is None else ckpt.step_of(loc[1])


def stamp(result: dict, kind: str, options: list[str], checkpoint: str | Path | None, step: int | None) -> dict:
    """The result with what every kept result records: its kind, settings, checkpoint, step and time (a
    date the result has, lm-eval's, stays)."""
    return {"evaluation": kind, "options": list(options), "checkpoint": None if checkpoint is None else str(checkpoint),
            "checkpoint_step": step, "date": time.time(), **result}


def write_json(path: Path, data: dict) -> Path:
    """Written whole or not at all, so an interrupted write never looks finished."""
    from pretrain.checkpoint import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2) + "\n")
    return path


def kind_of(path: Path, data: dict, kinds) -> str | None:
    """The evaluation that wrote a result file: recorded in it, or (files kept before kinds were recorded)
    the ``KIND_`` of its name."""
    kind = data.get("evaluation")
    if kind is None and "_" in path.stem:
        kind = path.stem.split("_", 1)[0]
    return kind if kind in kinds else None


def read_step_results(eval_dir: Path, step: int) -> dict[str, list[dict]]:
    """kind -> the results kept under ``eval_dir`` (RUN/eval/step-N) that scored ``step``, oldest first, each
    with its ``file`` (relative to ``eval_dir``). A file that records another step is left out, with a warning."""
    from eval.registry import evaluations

    kinds = evaluations()
    found: dict[str, list[tuple[float, dict]]] = {}
    for path in sorted(eval_dir.rglob("*.json")) if eval_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(data, dict) or (kind := kind_of(path, data, kinds)) is None:
            continue
        if (got := kinds[kind].step_of(data)) is not None and got != step:
            log.warning("%s scored step %d, not %d: left out of the card", path, got, step)
            continue
        data = {**data, "file": str(path.relative_to(eval_dir))}
        found.setdefault(kind, []).append((float(data.get("date") or path.stat().st_mtime), data))
    return {kind: [d for _, d in sorted(found[kind], key=lambda x: x[0])] for kind in kinds if kind in found}
