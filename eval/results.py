"""Where evaluation results are kept and how they are found again: the checkpoint's eval folder
(``RUN/eval/step-N/``, or ``EXPORT/eval/``) under timestamped names, ``KIND_<time>.json``, as lm-eval names
its result files, so a later evaluation never overwrites an earlier one. Every result file records the
evaluation kind that produced it (``evaluation``), the settings as typed (``options``), the checkpoint,
its step and the time; the model card reads a step's results back with :func:`read_step_results`. Every
file is written as every output is (tokenizer/atomic.py, :func:`write_files`): built beside, renamed into
place, and a temporary one is never read as a result."""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Callable
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


def json_file(data) -> Callable[[Path], None]:
    return lambda p: p.write_text(json.dumps(data, indent=2) + "\n")


def text_file(text: str) -> Callable[[Path], None]:
    return lambda p: p.write_text(text)


def csv_file(rows: list[dict]) -> Callable[[Path], None]:
    """One row per dict, its keys the header."""
    def fill(p: Path) -> None:
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return fill


def write_files(files: dict[Path, Callable[[Path], object]]) -> list[Path]:
    """The files of one result (in one folder), each ``fill(path)`` built at a temporary sibling, all renamed
    into place once every one is built (tokenizer/atomic.py): whole or not at all, so an interrupted or
    failed write never looks finished. Returns the paths written (a fill may write nothing: a kind that
    draws no figure)."""
    from tokenizer.atomic import write_atomically

    folder = next(iter(files)).parent
    write_atomically(folder, {p.name: fill for p, fill in files.items()})
    return [p for p in files if p.exists()]


def write_json(path: Path, data: dict) -> Path:
    return write_files({path: json_file(data)})[0]


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
    from tokenizer.atomic import is_temporary

    kinds = evaluations()
    found: dict[str, list[tuple[float, dict]]] = {}
    for path in sorted(eval_dir.rglob("*.json")) if eval_dir.is_dir() else []:
        if is_temporary(path.relative_to(eval_dir)):  # being written (or left by a crash): never a result
            continue
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
