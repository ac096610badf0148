"""The Hub model card (README.md) of a published checkpoint: YAML metadata (license, tags, datasets,
model-index from lm-eval results) and the training facts a reader needs to trust and reproduce it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pretrain.metrics import read_jsonl


def read_eval_results(paths: list[Path]) -> dict[str, dict[str, float]]:
    """task -> {metric: value} from lm-eval result JSONs (``{"results": {task: {"acc,none": 0.5, ...}}}``)."""
    out: dict[str, dict[str, float]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        for task, metrics in (data.get("results") or {}).items():
            for key, value in metrics.items():
                name = key.split(",")[0]
                if isinstance(value, (int, float)) and not name.endswith("_stderr") and name != "alias":
                    out.setdefault(task, {})[name] = float(value)
    return out


def _model_index(name: str, results: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    entries = [
        {"task": {"type": "text-generation"}, "dataset": {"name": task, "type": task},
         "metrics": [{"type": m, "value": round(v, 4), "name": m} for m, v in sorted(metrics.items())]}
        for task, metrics in sorted(results.items())
    ]
    return [{"name": name, "results": entries}] if entries else []


def _datasets(source: str) -> list[str]:
    if source.startswith("hf:"):
        return [source[3:].split(":")[0].split("@")[0]]
    return []


def render_card(repo_id: str, state: dict[str, Any], run_dir: Path, params: int,
                results: dict[str, dict[str, float]], license: str, hardware: str) -> str:
    """README.md text: YAML front matter then the facts (params, tokens, steps, schedule, hardware,
    polarization, final loss, the exact commands)."""
    cfg = state["config"]
    model, sched, data = cfg["model"], cfg["schedule"], cfg["data"]
    pol = model["polarize"]
    manifest = Path(data["path"]) / "manifest.json"
    source = json.loads(manifest.read_text())["source"]["spec"] if manifest.is_file() else data["path"]
    train = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train" and r.get("loss") is not None]
    val = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "val"]
    step, tokens = state["step"], state["step"] * data["global_batch_size"] * data["seq_len"]
    polar = pol["ones"] or pol["zeros"]
    mamba2 = model.get("arch") == "mamba2"
    name, hf_class = ("Mamba-2", "Mamba2ForCausalLM") if mamba2 else ("Mamba", "MambaForCausalLM")
    meta = {
        "license": license,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["mamba", "state-space-model", "polar-mamba"] + (["mamba2"] if mamba2 else [])
        + (["polarized-ssm"] if polar else []),
        "datasets": _datasets(source),
        "model-index": _model_index(repo_id.split("/")[-1], results),
    }
    kind = (f"polarized {name}: {model['ssm']['d_state']} learned state channels{' per head' if mamba2 else ''} + "
            f"{pol['ones']} fixed at A=1 + {pol['zeros']} fixed at A=0 ({pol['zero_mode']} zero channel)") if polar \
        else f"baseline {name}"
    if mamba2 and polar:  # docs/mamba2.md: stock Mamba-2 has one decay per head for all its channels
        loads = ("Stock `transformers` cannot load it (its Mamba-2 has one decay per head for all state channels); "
                 "load it with polar-mamba.")
        code = ["from models.hf import from_pretrained", f'model = from_pretrained("{repo_id}")']
    else:
        loads = f"It loads in stock `transformers` (`{hf_class}`)" + (
            ": the fixed channels are exported as A_log = -inf / +inf, which make exp(Δ·A) exactly 1 and 0."
            if polar else ".")
        code = [f"from transformers import AutoTokenizer, {hf_class}",
                f'tok = AutoTokenizer.from_pretrained("{repo_id}")',
                f'model = {hf_class}.from_pretrained("{repo_id}")']
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
        f"# {repo_id.split('/')[-1]}", "",
        f"A {params / 1e6:.0f}M-parameter {kind}, trained with "
        "[polar-mamba](https://arxiv.org/abs/2501.00658) (Wang et al., ICLR 2025: polarization adds state "
        "channels that never forget and channels with no memory, against Mamba's recency bias and "
        f"over-smoothing). {loads}",
        "",
        "```python",
        *code,
        "```",
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
        lines.append(f"| final training loss | {train[-1]['loss']:.4f} (step {train[-1]['step']}) |")
    if val:
        lines.append(f"| validation loss / perplexity | {val[-1]['val_loss']:.4f} / {val[-1]['val_ppl']:.2f} |")
    if results:
        lines += ["", "## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {v:.4f} |" for t, ms in sorted(results.items()) for m, v in sorted(ms.items())]
    lines += [
        "", "## Reproduce", "", "```bash",
        f"polar prepare --dataset {source} --tokenizer {data.get('tokenizer') or 'TOKENIZER'} --out {data['path']}",
        f"polar train {run_dir}/config.yaml",
        f"polar publish {run_dir} --step {step} --repo-id {repo_id}",
        "```", "",
    ]
    return "\n".join(lines)
