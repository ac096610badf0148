"""The Hub model card (README.md) of a published checkpoint: YAML metadata (license, tags, datasets,
model-index) and the facts a reader needs to trust and reproduce it.

Every number in the card belongs to the published step N: the training and validation loss logged at step N
(``metrics.jsonl``) and the evaluation results stored under ``RUN/eval/step-N/`` (``polar eval lm|niah`` and
``polar eval sweep`` write there). Results computed on a subset (``--limit``) are shown as partial and kept
out of ``model-index``, which the Hub reads as the model's scores.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from models.config import ModelConfig
from models.hf import stock_class
from models.registry import get_arch
from pretrain.metrics import read_jsonl

log = logging.getLogger(__name__)
PAPER_URL = "https://arxiv.org/abs/2501.00658"


@dataclass
class TaskResult:
    """One lm-eval task's scores at one step: (metric, value, stderr or None) triples and how they were made."""

    metrics: list[tuple[str, float, float | None]]
    version: Any = None
    num_fewshot: Any = None
    samples: tuple[int, int] | None = None  # (evaluated, in the task); evaluated < in the task = partial
    date: float = 0.0
    file: str = ""

    @property
    def partial(self) -> bool:
        return self.samples is not None and self.samples[0] < self.samples[1]


@dataclass
class StepResults:
    """Everything measured on one checkpoint step: lm-eval tasks and the newest NIAH grid."""

    tasks: dict[str, TaskResult] = field(default_factory=dict)
    niah: dict | None = None


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


def task_results(data: dict, file: str = "") -> dict[str, TaskResult]:
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
                               (n["effective"], n["original"]) if n else None, float(data.get("date") or 0), file)
    return out


def read_step_results(eval_dir: Path, step: int) -> StepResults:
    """The results stored under ``eval_dir`` (RUN/eval/step-N) for ``step``. Several results of one task:
    the newest complete one, else the newest partial one. A file that records another step is ignored."""
    res = StepResults()
    if not eval_dir.is_dir():
        return res
    niah_date = -1.0
    for path in sorted(eval_dir.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        if "cells" in data:  # a NIAH grid (polar eval niah)
            date = float(data.get("date") or path.stat().st_mtime)
            if data.get("checkpoint_step", step) == step and date > niah_date:
                res.niah, niah_date = data, date
            continue
        if "results" not in data:
            continue
        if (got := recorded_step(data)) is not None and got != step:
            log.warning("%s scored step %d, not %d: left out of the card", path, got, step)
            continue
        for task, new in task_results(data, str(path.relative_to(eval_dir))).items():
            old = res.tasks.get(task)
            if old is None or (old.partial, -old.date) > (new.partial, -new.date):
                res.tasks[task] = new
    return res


def step_record(records: list[dict], kind: str, step: int) -> dict | None:
    """The ``kind`` record logged at ``step``, else the last one before it (the card names its step)."""
    before = [r for r in records if r["kind"] == kind and r["step"] <= step]
    return before[-1] if before else None


def _model_index(name: str, results: StepResults) -> list[dict[str, Any]]:
    entries = [
        {"task": {"type": "text-generation"}, "dataset": {"name": task, "type": task},
         "metrics": [{"type": m, "value": round(v, 4), "name": m} for m, v, _ in r.metrics]}
        for task, r in sorted(results.tasks.items()) if r.metrics and not r.partial
    ]
    return [{"name": name, "results": entries}] if entries else []


def _datasets(source: str) -> list[str]:
    if source.startswith("hf:"):
        return [source[3:].split(":")[0].split("@")[0]]
    return []


def _size(params: int) -> str:
    return f"{params / 1e6:.0f}M" if params >= 1e6 else f"{params / 1e3:.0f}K"


def _fmt(v: float) -> str:
    return f"{v:.4f}" if abs(v) < 1e5 else f"{v:.4g}"


def _eval_section(results: StepResults, step: int) -> list[str]:
    lines = ["", "## Evaluation", ""]
    if not results.tasks and not results.niah:
        return lines + [f"No evaluation results stored for step {step} (`polar eval lm RUN --step {step} ...` "
                        f"writes them to RUN/eval/step-{step}/)."]
    if results.tasks:
        lines += [f"lm-evaluation-harness on step {step} (value ± standard error).", "",
                  "| task | version | shots | metric | value | ± stderr | examples |", "|---|---|---|---|---|---|---|"]
        for task, r in sorted(results.tasks.items()):
            n = "all" if r.samples is None else (f"{r.samples[0]} of {r.samples[1]} (partial)" if r.partial
                                                 else str(r.samples[0]))
            for m, v, err in r.metrics:
                lines.append(f"| {task} | {r.version} | {r.num_fewshot} | {m} | {_fmt(v)} | "
                             f"{'' if err is None else _fmt(err)} | {n} |")
        if any(r.partial for r in results.tasks.values()):
            lines += ["", "Rows marked partial were computed on a subset of the task (`--limit`): they are "
                      "indicative only and are not in the `model-index` metadata."]
    if results.niah:
        cells, cfg = results.niah["cells"], results.niah.get("config", {})
        lengths = sorted({c["length"] for c in cells})
        lines += ["", f"Needle in a haystack on step {step}: {len(cells) // max(len(lengths), 1)} depths × "
                  f"{cfg.get('samples', '?')} samples per length; rank 1 = the true value has the highest "
                  f"log-likelihood among {cfg.get('distractors', '?')} distractors (chance "
                  f"{cells[0]['chance_rank1']:.2f}).", "",
                  "| context length | greedy exact match | rank 1 |", "|---|---|---|"]
        for n in lengths:
            at = [c for c in cells if c["length"] == n]
            lines.append(f"| {n} | {sum(c['exact_match'] for c in at) / len(at):.3f} | "
                         f"{sum(c['rank1'] for c in at) / len(at):.3f} |")
    return lines


def _reproduce(cfg: dict, source: str, run_dir: Path, step: int, world: int, repo_id: str, revision: str,
               results: StepResults, project: str) -> list[str]:
    data = cfg["data"]
    tok = data.get("tokenizer") or "TOKENIZER"
    meta_file = Path(tok) / "polar_tokenizer.json"
    tok_meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    vocab = tok_meta.get("vocab_size", cfg["model"].get("vocab_size"))
    tok_source = tok_meta.get("source") or source
    lines = ["", "## Reproduce", "", f"With {project} installed (`pip install -e .[eval]`):", "", "```bash",
             f"polar tokenizer train --dataset {tok_source} --vocab-size {vocab} --out {tok}",
             f"polar prepare --dataset {source} --tokenizer {tok} --out {data['path']}",
             f"torchrun --standalone --nproc-per-node {world} -m pretrain.cli train {run_dir}/config.yaml"
             + ("" if world > 1 else "   # or: polar train " + f"{run_dir}/config.yaml"),
             ]
    by_limit: dict[str, list[str]] = {}  # one evaluation command per --limit used
    for task, r in sorted(results.tasks.items()):
        by_limit.setdefault(f" --limit {r.samples[0]}" if r.partial else "", []).append(task)
    for limit, tasks in sorted(by_limit.items()):
        lines.append(f"polar eval lm {run_dir} --step {step} --tasks {','.join(tasks)}{limit}")
    lines += [f"polar publish {run_dir} --step {step} --repo-id {repo_id}"
              + ("" if revision == f"step{step}" else f" --revision {revision}"), "```",
              "", f"On several nodes: `polar launch slurm {run_dir}/config.yaml --nodes N --submit`."]
    return lines


def render_card(repo_id: str, state: dict[str, Any], run_dir: Path, params: int, results: StepResults,
                license: str, hardware: str, project_url: str | None = None, revision: str | None = None) -> str:
    """README.md text: YAML front matter, then the model, its intended use and limitations, the training
    facts and losses at the published step, that step's evaluation results and the commands that made it."""
    cfg = state["config"]
    model, sched, data = cfg["model"], cfg["schedule"], cfg["data"]
    pol = model["polarize"]
    manifest = Path(data["path"]) / "manifest.json"
    source = json.loads(manifest.read_text())["source"]["spec"] if manifest.is_file() else data["path"]
    records = read_jsonl(run_dir / "metrics.jsonl")
    step, tokens = state["step"], state["step"] * data["global_batch_size"] * data["seq_len"]
    revision = revision or f"step{step}"
    train = step_record([r for r in records if r.get("loss") is not None or r["kind"] != "train"], "train", step)
    val = step_record(records, "val", step)
    polar = pol["ones"] or pol["zeros"]
    model_cfg = ModelConfig.from_dict(model)
    family, hf_class = get_arch(model_cfg.arch).title, stock_class(model_cfg)
    per_head = " per head" if hasattr(model_cfg, "n_heads") else ""  # Mamba-2's channels belong to heads
    name = repo_id.split("/")[-1]
    meta = {
        "license": license,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(["mamba", "state-space-model", "polar-mamba", model_cfg.arch]))
        + (["polarized-ssm"] if polar else []),
        "datasets": _datasets(source),
        "model-index": _model_index(name, results),
    }
    kind = (f"polarized {family}: {model['ssm']['d_state']} learned state channels{per_head} "
            f"+ {pol['ones']} fixed at A=1 + {pol['zeros']} fixed at A=0 ({pol['zero_mode']} zero channel)") \
        if polar else f"baseline {family}"
    project = f"[polar-mamba]({project_url})" if project_url else "polar-mamba"
    if hf_class is None:  # docs/mamba2.md: stock Mamba-2 has one decay per head for all its channels
        loads = ("Stock `transformers` cannot load it (its Mamba-2 has one decay per head for all state channels); "
                 "load it with polar-mamba.")
        code = ["from models.hf import from_pretrained", f'model = from_pretrained("{repo_id}", revision="{revision}")']
    else:
        loads = f"It loads in stock `transformers` (`{hf_class}`)" + (
            ": the fixed channels are exported as A_log = -inf / +inf, which make exp(Δ·A) exactly 1 and 0."
            if polar else ".")
        code = [f"from transformers import AutoTokenizer, {hf_class}",
                f'tok = AutoTokenizer.from_pretrained("{repo_id}", revision="{revision}")',
                f'model = {hf_class}.from_pretrained("{repo_id}", revision="{revision}")']
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {name}", "",
        f"A {_size(params)}-parameter {kind}, checkpoint of step {step:,}, trained with {project}, an "
        f"implementation of [Wang et al., ICLR 2025]({PAPER_URL}) (polarization adds state channels that never "
        f"forget and channels with no memory, against Mamba's recency bias and over-smoothing). {loads}",
        "",
        "```python",
        *code,
        "```",
        "",
        "## Intended use and limitations",
        "",
        "A research artifact: a small base language model for studying state-space models (recency, "
        "over-smoothing, long-context retrieval) and for comparing baseline and polarized Mamba trained alike. "
        f"It was trained on `{source}` only ({tokens:,} tokens), is not instruction-tuned or aligned, and "
        "continues text in the style of its training data; it states falsehoods fluently and is not meant for "
        "any application where its output would be relied on. Its scores describe this step only.",
        "",
        "## Training",
        "",
        "| | |", "|---|---|",
        f"| parameters | {params:,} |",
        f"| d_model / layers | {model['d_model']} / {model['n_layer']} |",
        f"| data | `{source}` |",
        f"| tokens | {tokens:,} ({tokens / params:.1f} per parameter) |",
        f"| steps | {step:,} of {sched.get('steps') or 'budgeted'} × {data['global_batch_size']} × "
        f"{data['seq_len']} tokens |",
        f"| schedule | {sched['kind']}, peak LR {cfg['optim']['lr']}, floor × {cfg['optim']['min_lr_ratio']}, "
        f"AdamW β={tuple(cfg['optim']['betas'])}, wd {cfg['optim']['weight_decay']}, "
        f"clip {cfg['optim']['grad_clip']} |",
        f"| precision / parallelism | {cfg['precision']['dtype']}, DeepSpeed ZeRO-{cfg['distributed']['zero_stage']} |",
        f"| hardware | {hardware} |",
    ]
    if train:
        lines.append(f"| training loss at step {train['step']} | {train['loss']:.4f} |")
    if val:
        lines.append(f"| validation loss / perplexity at step {val['step']} | {val['val_loss']:.4f} / "
                     f"{val['val_ppl']:.2f} |")
    lines += _eval_section(results, step)
    lines += _reproduce(cfg, source, run_dir, step, int(state.get("world_size") or 1), repo_id, revision, results,
                        project)
    return "\n".join(lines) + "\n"
