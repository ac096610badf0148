"""MQAR training and evaluation (the paper's Table 2) and the `polar mqar train|eval` commands.

A sweep trains every ``sweep.variants`` entry (model overrides: default, ones only, zeros only, both)
at every depth in ``sweep.n_layers`` on a length curriculum (``data.train`` stages, in order), then
scores recall accuracy at query positions on the ``data.eval`` stages. Each trained model is a folder
``OUT/NAME/VARIANT-LN/`` (config.yaml, model.pt, result.json); the sweep writes ``results.json`` and
``results.md`` (rows: variant x layers, columns: KV pairs at eval + average) beside them. A finished
folder is skipped when the sweep runs again, so an interrupted sweep continues. One process, plain
PyTorch: MQAR models are small.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from models.config import ModelConfig
from models.typed_config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict


@dataclass
class Stage:
    seq_len: int
    num_kv_pairs: int
    num_examples: int


@dataclass
class MQARDataConfig:
    vocab_size: int = 8192
    power_a: float = 0.01  # zoology's query-gap power law
    # Curriculum (trained in this order); the paper grows lengths 64 -> 1024 with the KV pairs.
    train: list[Stage] = field(default_factory=lambda: [Stage(64, 4, 1000)])
    eval: list[Stage] = field(default_factory=lambda: [Stage(64, 4, 200)])
    batch_size: int = 128
    eval_batch_size: int = 64
    seed: int = 0  # train stage i uses seed + i, eval stage j uses seed + 10_000 + j

    def __post_init__(self):
        if not self.train or not self.eval:
            raise ConfigError("data.train and data.eval need at least one stage each")
        for s in [*self.train, *self.eval]:
            if 4 * s.num_kv_pairs > s.seq_len or s.num_kv_pairs >= self.vocab_size // 2:
                raise ConfigError(f"data stage {s}: needs seq_len >= 4 x num_kv_pairs and "
                                  f"num_kv_pairs < vocab_size / 2")


@dataclass
class MQAROptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1  # not on norms, biases, A_log, D (pretrain.engine.param_groups)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0  # cosine decays to lr x min_lr_ratio
    grad_clip: float = 1.0
    epochs: int = 1  # passes over the whole curriculum


@dataclass
class SweepConfig:
    # name -> dotted model overrides; the paper's Table 2 rows.
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "default": {}, "ones": {"polarize.ones": 1}, "zeros": {"polarize.zeros": 1},
        "both": {"polarize.ones": 1, "polarize.zeros": 1},
    })
    n_layers: list[int] = field(default_factory=lambda: [2, 4])


@dataclass
class MQARRunConfig:
    name: str = "mqar"
    out_dir: str = "runs"  # the sweep folder is out_dir/name
    seed: int = 0  # model initialisation

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class MQARConfig:
    run: MQARRunConfig = field(default_factory=MQARRunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: MQARDataConfig = field(default_factory=MQARDataConfig)
    optim: MQAROptimConfig = field(default_factory=MQAROptimConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    progress_bar: bool = True

    def __post_init__(self):
        if self.model.vocab_size != self.data.vocab_size:
            raise ConfigError(f"model.vocab_size ({self.model.vocab_size}) must equal data.vocab_size "
                              f"({self.data.vocab_size})")

    def variant(self, name: str, n_layer: int) -> MQARConfig:
        """This config with the model of one sweep cell."""
        if name not in self.sweep.variants:
            raise ConfigError(f"unknown variant '{name}': choose from {list(self.sweep.variants)}")
        model = apply_overrides(to_dict(self.model), {**self.sweep.variants[name], "n_layer": n_layer})
        return replace(self, model=ModelConfig.from_dict(model))


def load_mqar_config(path: str | Path, overrides: dict[str, Any] | None = None) -> MQARConfig:
    """YAML (``model`` may name a preset, as in training recipes) plus dotted overrides."""
    from pretrain.config import _expand_model_preset

    data = apply_overrides(load_yaml(path), overrides or {})
    return from_dict(MQARConfig, _expand_model_preset(data))


def cell_name(variant: str, n_layer: int) -> str:
    return f"{variant}-L{n_layer}"


# Training and scoring -------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stage_data(cfg: MQARDataConfig, stage: Stage, seed: int):
    from eval.mqar_data import multiquery_ar

    return multiquery_ar(cfg.vocab_size, stage.seq_len, stage.num_kv_pairs, stage.num_examples, seed, cfg.power_a)


def _lr(step: int, total: int, o: MQAROptimConfig) -> float:
    warmup = int(o.warmup_fraction * total)
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_model(cfg: MQARConfig, desc: str = "mqar") -> tuple[torch.nn.Module, list[float]]:
    """Train one model on the curriculum; returns it (eval mode) and the per-step losses."""
    from tqdm import tqdm

    from models.build import build_model
    from pretrain.engine import param_groups

    torch.manual_seed(cfg.run.seed)
    device, o, d = default_device(), cfg.optim, cfg.data
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
    steps_per_epoch = sum(s.num_examples // d.batch_size for s in d.train)
    total = o.epochs * steps_per_epoch
    if total == 0:
        raise ConfigError("data.train stages are smaller than one batch: raise num_examples or lower batch_size")
    stages = [_stage_data(d, s, d.seed + i) for i, s in enumerate(d.train)]
    shuffle = torch.Generator().manual_seed(d.seed)
    losses: list[float] = []
    model.train()
    with tqdm(total=total, desc=desc, disable=not cfg.progress_bar, dynamic_ncols=True) as bar:
        for _ in range(o.epochs):
            for inputs, labels in stages:
                order = torch.randperm(len(inputs), generator=shuffle)
                for b in range(len(inputs) // d.batch_size):
                    idx = order[b * d.batch_size:(b + 1) * d.batch_size]
                    for group in opt.param_groups:
                        group["lr"] = _lr(len(losses), total, o)
                    loss = model(inputs[idx].to(device), labels[idx].to(device), return_logits=False).loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                    opt.step()
                    losses.append(loss.item())
                    bar.update()
                    bar.set_postfix(len=inputs.shape[1], loss=f"{losses[-1]:.3f}")
    return model.eval(), losses


@torch.no_grad()
def accuracy(model: torch.nn.Module, cfg: MQARDataConfig, stage: Stage, seed: int) -> float:
    """Fraction of queries whose greedy next token (over the MQAR vocabulary) is the key's value."""
    device = next(model.parameters()).device
    inputs, labels = _stage_data(cfg, stage, seed)
    correct = total = 0
    for b in range(0, len(inputs), cfg.eval_batch_size):
        x, y = inputs[b:b + cfg.eval_batch_size].to(device), labels[b:b + cfg.eval_batch_size].to(device)
        pred = model(x).logits[..., : cfg.vocab_size].argmax(-1)
        mask = y != -100
        correct += int((pred[mask] == y[mask]).sum())
        total += int(mask.sum())
    return correct / total


def evaluate(model: torch.nn.Module, cfg: MQARDataConfig) -> dict[str, float]:
    """Accuracy per eval stage, keyed ``"L{seq_len}-kv{pairs}"``, plus ``"average"``."""
    model.eval()
    accs = {f"L{s.seq_len}-kv{s.num_kv_pairs}": accuracy(model, cfg, s, cfg.seed + 10_000 + j)
            for j, s in enumerate(cfg.eval)}
    return {**accs, "average": sum(accs.values()) / len(accs)}


# Sweep folders and the table ------------------------------------------------------------------------
def train_cell(cfg: MQARConfig, variant: str, n_layer: int, force: bool = False) -> dict[str, Any]:
    """Train + evaluate one sweep cell into OUT/NAME/VARIANT-LN/ (skipped when result.json exists)."""
    folder = cfg.run.dir / cell_name(variant, n_layer)
    if (folder / "result.json").is_file() and not force:
        return json.loads((folder / "result.json").read_text())
    cell = cfg.variant(variant, n_layer)
    start = time.time()
    model, losses = train_model(cell, desc=cell_name(variant, n_layer))
    result = {
        "variant": variant, "n_layer": n_layer, "params": sum(p.numel() for p in model.parameters()),
        "steps": len(losses), "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_seconds": round(time.time() - start, 1), "accuracy": evaluate(model, cell.data),
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(to_dict(cell), sort_keys=False))
    torch.save({"model_config": to_dict(cell.model), "state_dict": model.state_dict()}, folder / "model.pt")
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def load_cell_model(folder: Path) -> tuple[torch.nn.Module, MQARConfig]:
    from models.build import build_model

    saved = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    model = build_model(ModelConfig.from_dict(saved["model_config"]))
    model.load_state_dict(saved["state_dict"])
    return model.to(default_device()).eval(), from_dict(MQARConfig, load_yaml(folder / "config.yaml"))


def markdown_table(results: list[dict[str, Any]]) -> str:
    """Rows variant x layers; columns the eval stages' KV pairs and the average (accuracy in %)."""
    cols = [k for k in results[0]["accuracy"] if k != "average"]
    head = ["model", "layers", *(c.split("-")[1].replace("kv", "KV ") for c in cols), "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [f"{100 * r['accuracy'][c]:.2f}" for c in [*cols, "average"]]
        lines.append(f"| {r['variant']} | {r['n_layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(cfg: MQARConfig) -> list[dict[str, Any]]:
    """Collect every finished cell of the sweep (in config order) into results.json and results.md."""
    results = [json.loads(p.read_text()) for v in cfg.sweep.variants for n in cfg.sweep.n_layers
               if (p := cfg.run.dir / cell_name(v, n) / "result.json").is_file()]
    if results:
        (cfg.run.dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (cfg.run.dir / "results.md").write_text(markdown_table(results))
    return results


def train_sweep(cfg: MQARConfig, variants: list[str] | None = None, layers: list[int] | None = None,
                force: bool = False) -> list[dict[str, Any]]:
    """Train the chosen cells (default: all), then rewrite the sweep's table; returns its rows."""
    for v in variants or cfg.sweep.variants:
        for n in layers or cfg.sweep.n_layers:
            r = train_cell(cfg, v, n, force)
            print(f"{cell_name(v, n)}: average accuracy {100 * r['accuracy']['average']:.2f}% "
                  f"({r['steps']} steps, {r['train_seconds']} s)", flush=True)
    return write_table(cfg)


def rescore_sweep(cfg: MQARConfig) -> list[dict[str, Any]]:
    """Score every trained cell of the sweep on ``cfg.data.eval`` again and rewrite the table."""
    for v in cfg.sweep.variants:
        for n in cfg.sweep.n_layers:
            folder = cfg.run.dir / cell_name(v, n)
            if (folder / "model.pt").is_file():
                result = json.loads((folder / "result.json").read_text())
                result["accuracy"] = evaluate(load_cell_model(folder)[0], cfg.data)
                (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    results = write_table(cfg)
    if not results:
        raise FileNotFoundError(f"no trained cells under {cfg.run.dir}: run `polar mqar train CONFIG` first")
    return results
