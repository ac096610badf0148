"""The ``lm`` evaluation: lm-evaluation-harness tasks (`polar eval lm`, eval/harness.py). lm-eval writes the
result file itself (``lm_<time>.json``); we add the registry's record (kind, options, checkpoint step) to it.
Its card section is the per-task table (newest complete result of each task, else the newest partial one)
and the only scores in the card's ``model-index``: complete results, never ``--limit`` subsets."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eval.registry import DOCS, Evaluation, Score, register


@dataclass
class TaskResult:
    """One lm-eval task's scores in one result file: (metric, value, stderr or None) and how they were made."""

    metrics: list[tuple[str, float, float | None]]
    version: Any = None
    num_fewshot: Any = None
    samples: tuple[int, int] | None = None  # (evaluated, in the task); evaluated < in the task = partial

    @property
    def partial(self) -> bool:
        return self.samples is not None and self.samples[0] < self.samples[1]


def recorded_step(data: dict) -> int | None:
    """The checkpoint step an lm-eval result file says it scored (the `polar` model records it)."""
    cfg = data.get("config") or {}
    if cfg.get("checkpoint_step") is not None:
        return int(cfg["checkpoint_step"])
    args = cfg.get("model_args")
    if isinstance(args, str):
        args = dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
    step = (args or {}).get("step")
    return None if step is None else int(step)


def task_results(data: dict) -> dict[str, TaskResult]:
    """task -> TaskResult of one lm-eval result JSON. Only the task's metrics count (``higher_is_better``
    names them; bookkeeping such as ``alias`` or ``sample_len`` is left out); groups are skipped."""
    out = {}
    for task, values in (data.get("results") or {}).items():
        if task in (data.get("group_subtasks") or {}):
            continue
        names = (data.get("higher_is_better") or {}).get(task)
        metrics = []
        for key, value in sorted(values.items()):
            name, _, filt = key.partition(",")
            if not filt or "_stderr" in name or not isinstance(value, int | float) or isinstance(value, bool):
                continue
            if names is not None and name not in names:
                continue
            err = values.get(f"{name}_stderr,{filt}")
            metrics.append((name if filt == "none" else f"{name} ({filt})", float(value),
                            float(err) if isinstance(err, int | float) else None))
        n = (data.get("n-samples") or {}).get(task)
        out[task] = TaskResult(metrics, (data.get("versions") or {}).get(task), (data.get("n-shot") or {}).get(task),
                               (n["effective"], n["original"]) if n else None)
    return out


def best_tasks(results: list[dict]) -> dict[str, tuple[TaskResult, dict]]:
    """task -> (its scores, the result file) to show: the newest complete result, else the newest partial."""
    best: dict[str, tuple[TaskResult, dict]] = {}
    for data in results:  # oldest first
        for task, new in task_results(data).items():
            old = best.get(task)
            if old is None or not new.partial or old[0].partial:
                best[task] = (new, data)
    return best


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"


class LmEvaluation(Evaluation):
    name = "lm"
    help = "lm-eval-harness tasks with the `polar` model registered (lm_eval's own flags)"
    description = ("`lm_eval run` with the `polar` model: every flag is lm-eval's own. --model defaults to polar; "
                   "CHECKPOINT and --step fill --model_args; our offline tasks (--tasks polar_offline) need no "
                   f"--include_path. Results: RUN/eval/step-N/lm_<time>.json. See {DOCS}.")
    usage = "polar eval lm [CHECKPOINT] [--step N] --tasks TASKS [lm_eval run flags ...]"

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        from eval.options import add_lm_options

        add_lm_options(p)

    def evaluate(self, args: argparse.Namespace, options: list[str], progress: bool = True) -> tuple[dict, list[Path]]:
        """lm-eval's own run (it prints its table and writes ``lm_<time>.json``), then our record added to
        that file; no file (and an empty result) when there is no output folder, e.g. for a Hub id."""
        from eval.harness import run_lm_eval
        from eval.results import stamp, write_json

        path = run_lm_eval(args)
        if path is None:
            return {}, []
        data = stamp(json.loads(path.read_text()), self.name, options, args.checkpoint, None)
        data["checkpoint_step"] = recorded_step(data)
        write_json(path, data)
        return data, [path]

    def report(self, result: dict) -> str:
        return ""  # lm-eval printed its own table

    def summarize(self, result: dict) -> dict[str, Score]:
        """"task/metric" with lm-eval's standard error."""
        return {f"{task}/{m}": Score(v, err) for task, r in task_results(result).items() for m, v, err in r.metrics}

    def step_of(self, result: dict) -> int | None:
        return recorded_step(result)

    def shown(self, results: list[dict]) -> list[dict]:
        files = {id(data): data for _, data in best_tasks(results).values()}
        return [d for d in results if id(d) in files]

    def card_section(self, results: list[dict], step: int) -> list[str]:
        best = best_tasks(results)
        lines = ["", f"lm-evaluation-harness on step {step} (value ± standard error; shots and examples as run).", "",
                 "| task | version | shots | metric | value | ± stderr | examples |", "|---|---|---|---|---|---|---|"]
        for task, (r, _) in sorted(best.items()):
            n = "all" if r.samples is None else (f"{r.samples[0]} of {r.samples[1]} (partial)" if r.partial
                                                 else str(r.samples[0]))
            for m, v, err in r.metrics:
                lines.append(f"| {task} | {r.version} | {r.num_fewshot} | {m} | {_fmt(v)} | "
                             f"{'' if err is None else _fmt(err)} | {n} |")
        if any(r.partial for r, _ in best.values()):
            lines += ["", "Rows marked partial were computed on a subset of the task (`--limit`): they are "
                      "indicative only and are not in the `model-index` metadata."]
        return lines

    def model_index(self, results: list[dict]) -> list[dict]:
        return [{"task": {"type": "text-generation"}, "dataset": {"name": task, "type": task},
                 "metrics": [{"type": m, "value": round(v, 4), "name": m} for m, v, _ in r.metrics]}
                for task, (r, _) in sorted(best_tasks(results).items()) if r.metrics and not r.partial]

    def reproduce(self, result: dict, checkpoint: str | Path, step: int) -> str | None:
        """The recorded options; a file kept before results recorded them: its tasks and --limit."""
        if "options" not in result:
            limit = (result.get("config") or {}).get("limit")
            result = {"options": ["--tasks", ",".join(task_results(result)),
                                  *([] if limit is None else ["--limit", f"{limit:g}"])]}
        return super().reproduce(result, checkpoint, step)


register(LmEvaluation())
