"""The Hub model card (README.md) of a published checkpoint: YAML metadata (license, tags, datasets,
model-index) and the facts a reader needs to trust and reproduce it.

Every number in the card belongs to the published step N: the training and validation loss logged at step N
(``metrics.jsonl``) and the evaluation results kept under ``RUN/eval/step-N/`` (``polar eval KIND`` and
``polar eval sweep`` write there). Each registered evaluation (eval/registry.py) renders its own section,
with the settings of every result it shows, its ``model-index`` entries (lm: complete results only, never
``--limit`` subsets) and the commands that reproduce them.

Nothing private: local paths appear relative to the folder holding the run's ``run.out_dir`` or by their last
component (pretrain/privacy.py). The card states the code's name, version and license (pretrain/about.py),
linked only to a code URL the user gives (``polar publish --project-url``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from models.config import ModelConfig
from models.hf import stock_class
from models.registry import get_arch
from pretrain.about import code_line
from pretrain.metrics import read_jsonl
from pretrain.privacy import public_path, public_spec

StepResults = dict[str, list[dict]]  # evaluation name -> its results kept for the step (eval.results)
PAPER_URL = "https://arxiv.org/abs/2501.00658"


def step_record(records: list[dict], kind: str, step: int) -> dict | None:
    """The ``kind`` record logged at ``step``, else the last one before it (the card names its step)."""
    before = [r for r in records if r["kind"] == kind and r["step"] <= step]
    return before[-1] if before else None


def _model_index(name: str, results: StepResults) -> list[dict[str, Any]]:
    from eval.registry import get

    entries = [e for kind, kept in results.items() for e in get(kind).model_index(kept)]
    return [{"name": name, "results": entries}] if entries else []


def _datasets(source: str) -> list[str]:
    if source.startswith("hf:"):
        return [source[3:].split(":")[0].split("@")[0]]
    return []


def _size(params: int) -> str:
    return f"{params / 1e6:.0f}M" if params >= 1e6 else f"{params / 1e3:.0f}K"


def _eval_section(results: StepResults, step: int) -> list[str]:
    from eval.registry import get

    lines = ["", "## Evaluation"]
    if not results:
        return lines + ["", f"No evaluation results stored for step {step} (`polar eval KIND RUN --step {step} ...` "
                        f"writes them to RUN/eval/step-{step}/; `polar eval --help` lists the kinds)."]
    for kind, kept in results.items():
        evaluation = get(kind)
        lines += evaluation.card_section(evaluation.shown(kept), step)
    return lines


def _eval_commands(results: StepResults, run_dir: str, step: int, base: Path) -> list[str]:
    """One command per shown result (identical ones once), each keeping a new result beside the one shown; local
    paths among its options are made public (pretrain/privacy.py)."""
    from eval.registry import get

    def public(r: dict) -> dict:
        return {**r, "options": [public_path(o, base) for o in r["options"]]} if "options" in r else r

    commands = [c for kind, kept in results.items() for r in get(kind).shown(kept)
                if (c := get(kind).reproduce(public(r), run_dir, step)) is not None]
    if not commands:
        return []
    return ["", f"The evaluations shown above, each with the settings it was computed with (run as written, each "
            f"keeps a new result in `{run_dir}/eval/step-{step}/` beside the one shown):", "", "```bash",
            *dict.fromkeys(commands), "```"]


def _prepared(data: dict, base: Path) -> list[tuple[str, str, float]]:
    """(dataset spec, prepared folder, share) of each training source (data.path, or each of data.sources), as a
    card may show them (pretrain/privacy.py)."""
    sources = data.get("sources") or [{"path": data["path"], "weight": 1.0}]
    total = sum(src["weight"] for src in sources)
    out = []
    for src in sources:
        manifest = Path(src["path"]) / "manifest.json"
        spec = json.loads(manifest.read_text())["source"]["spec"] if manifest.is_file() else src["path"]
        out.append((public_spec(spec, base), public_path(src["path"], base), src["weight"] / total))
    return out


def _reproduce(cfg: dict, run_dir: Path, step: int, world: int, repo_id: str, revision: str,
               results: StepResults, project: str, base: Path) -> list[str]:
    from tokenizer import tokenizer_kind

    data = cfg["data"]
    tok_path = data.get("tokenizer") or "TOKENIZER"
    meta_file = Path(tok_path) / "polar_tokenizer.json"
    tok_meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    vocab = tok_meta.get("vocab_size", cfg["model"].get("vocab_size"))
    prepared = _prepared(data, base)
    tok_source = public_spec(tok_meta["source"], base) if tok_meta.get("source") else prepared[0][0]
    tok, run_dir = public_path(tok_path, base), public_path(run_dir, base)
    # an ecosystem tokenizer (tokenizer.json, Hub id) is used as it is; only ours is trained first
    train_tok = [f"polar tokenizer train --dataset {tok_source} --vocab-size {vocab} --out {tok}"] \
        if tok_path == "TOKENIZER" or tokenizer_kind(tok_path) == "sentencepiece" else []
    lines = ["", "## Reproduce", "", f"With {project} installed (`pip install -e .[eval]`):", "", "```bash",
             *train_tok,
             *(f"polar prepare --dataset {spec} --tokenizer {tok} --out {path}" for spec, path, _ in prepared),
             f"torchrun --standalone --nproc-per-node {world} -m pretrain.cli train {run_dir}/config.yaml"
             + ("" if world > 1 else "   # or: polar train " + f"{run_dir}/config.yaml"), "```",
             "", f"On several nodes: `polar launch slurm {run_dir}/config.yaml --nodes N --submit`."]
    return lines + _eval_commands(results, run_dir, step, base) + [
        "", "Then the upload:", "", "```bash", f"polar publish {run_dir} --step {step} --repo-id {repo_id}"
        + ("" if revision == f"step{step}" else f" --revision {revision}"), "```"]


def render_card(repo_id: str, state: dict[str, Any], run_dir: Path, params: int, results: StepResults,
                license: str, hardware: str, project_url: str | None = None, revision: str | None = None) -> str:
    """README.md text: YAML front matter, then the model, its intended use and limitations, the training
    facts and losses at the published step, that step's evaluation results and the commands that made it."""
    cfg = state["config"]
    model, sched, data = cfg["model"], cfg["schedule"], cfg["data"]
    pol = model["polarize"]
    base = run_dir.parent.parent  # the folder holding run.out_dir: the card's paths are relative to it
    prepared = _prepared(data, base)
    source = prepared[0][0] if len(prepared) == 1 else ", ".join(f"{spec} ({share:.0%})" for spec, _, share in prepared)
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
        "datasets": [d for spec, _, _ in prepared for d in _datasets(spec)],
        "model-index": _model_index(name, results),
    }
    kind = (f"polarized {family}: {model['ssm']['d_state']} learned state channels{per_head} "
            f"+ {pol['ones']} fixed at A=1 + {pol['zeros']} fixed at A=0 ({pol['zero_mode']} zero channel)") \
        if polar else f"baseline {family}"
    project = f"[polar-mamba]({project_url})" if project_url else "polar-mamba"  # a link only when configured
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
        f"| code | {code_line(project_url, state.get('code_version'))} |",  # the version that trained it
    ]
    if data.get("document_boundaries") == "reset":  # a training convention: the exported model is unchanged
        lines.append("| packed documents | every layer's state reset at each document start "
                     "(`data.document_boundaries: reset`); inference is unchanged (one document) |")
    if (init := model.get("init_from") or {}).get("path"):  # model.init_from: continued from a checkpoint
        lines.append(f"| initialised from | `{public_path(init['path'], base)}` (revision "
                     f"{init['revision'] or 'local'}, weights sha256 `{init['sha256']}`) |")
    if train:
        lines.append(f"| training loss at step {train['step']} | {train['loss']:.4f} |")
    if val:
        lines.append(f"| validation loss / perplexity at step {val['step']} | {val['val_loss']:.4f} / "
                     f"{val['val_ppl']:.2f} |")
    lines += _eval_section(results, step)
    lines += _reproduce(cfg, run_dir, step, int(state.get("world_size") or 1), repo_id, revision, results,
                        project, base)
    return "\n".join(lines) + "\n"
