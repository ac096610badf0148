"""MQAR training and evaluation (the paper's Table 2) and the `polar mqar train|eval` commands.

A sweep trains every ``sweep.variants`` entry (model overrides: default, ones only, zeros only, both)
at every depth in ``sweep.n_layers`` on a length curriculum (``data.train`` stages, in order), then
scores recall accuracy at query positions on the ``data.eval`` stages. Each trained model is a folder
``OUT/NAME/VARIANT-LN/`` (config.yaml, model.pt, result.json); the sweep writes ``results.json`` and
``results.md`` (rows: variant x layers, columns: KV pairs at eval + average; below it, every cell the
paper's Table 2 also has, ours beside the paper's with the difference) beside them. A finished folder is
skipped when the sweep runs again, so an interrupted sweep continues; a rescoring (`polar mqar eval`) is kept
as ``mqar_eval_<time>.json`` beside the earlier ones. Every file is written as every output is
(tokenizer/atomic.py). One process, plain PyTorch: MQAR models are small.

The paper's protocol (its released code, VITA-Group/SSM-Bottleneck on zoology) is a set of options,
each off by default: ``data.filler: zeros``, ``data.shuffle: false``, ``optim.weight_decay_params: all``,
``optim.grad_clip: 0``, ``optim.schedule: epoch``, ``optim.early_stop_accuracy``, and the model's
``init: zoology`` and ``final_norm: layernorm`` (configs/mqar/paper.yaml sets them all).
"""

from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from eval.results import json_file, text_file, timestamp, write_files
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
    batch_size: int = 128  # a stage's last batch holds the remainder (as zoology's loader)
    eval_batch_size: int = 64
    seed: int = 0  # train stage i uses seed + i, eval stage j uses seed + 10_000 + j
    filler: Literal["random", "zeros"] = "random"  # non-context, non-query tokens; the paper's runs: zeros
    shuffle: bool = True  # reshuffle each stage every epoch; false: in order (the paper's loader)

    def __post_init__(self):
        if not self.train or not self.eval:
            raise ConfigError("data.train and data.eval need at least one stage each")
        if self.filler not in ("random", "zeros"):
            raise ConfigError(f"data.filler must be 'random' or 'zeros', got {self.filler!r}")
        for s in [*self.train, *self.eval]:
            if s.num_examples <= 0:
                raise ConfigError(f"data stage {s}: num_examples must be > 0")
            if 4 * s.num_kv_pairs > s.seq_len or s.num_kv_pairs >= self.vocab_size // 2:
                raise ConfigError(f"data stage {s}: needs seq_len >= 4 x num_kv_pairs and "
                                  f"num_kv_pairs < vocab_size / 2")


@dataclass
class MQAROptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    # groups: no decay on norms, biases, A_log, D (pretrain.engine.param_groups); all: every parameter,
    # as the paper's AdamW(model.parameters(), weight_decay=0.1).
    weight_decay_params: Literal["groups", "all"] = "groups"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_fraction: float = 0.0
    min_lr_ratio: float = 0.0  # cosine decays to lr x min_lr_ratio
    # step: cosine over optimizer steps (after warmup). epoch: constant within an epoch, cosine over
    # epochs (torch's CosineAnnealingLR(T_max=epochs) stepped once per epoch: the paper's).
    schedule: Literal["step", "epoch"] = "step"
    grad_clip: float = 1.0  # max global grad norm; 0 turns clipping off (the paper clips nothing)
    epochs: int = 1  # passes over the whole curriculum
    # After each epoch score data.eval and stop once its average exceeds this (the paper: 0.99 on its
    # test stages, which it also reports); null: no per-epoch scoring.
    early_stop_accuracy: float | None = None

    def __post_init__(self):
        if self.schedule not in ("step", "epoch") or self.weight_decay_params not in ("groups", "all"):
            raise ConfigError(f"optim.schedule must be step|epoch and optim.weight_decay_params groups|all, "
                              f"got {self.schedule!r}, {self.weight_decay_params!r}")
        if self.schedule == "epoch" and self.warmup_fraction:
            raise ConfigError("optim.warmup_fraction needs optim.schedule: step (the per-epoch cosine has no warmup)")
        if self.epochs <= 0 or self.grad_clip < 0:
            raise ConfigError(f"optim.epochs must be > 0 and optim.grad_clip >= 0, got {self.epochs}, {self.grad_clip}")


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


@functools.lru_cache(maxsize=16)  # the cells of a sweep share their data
def _generate(vocab: int, power_a: float, filler: str, seq_len: int, pairs: int, n: int, seed: int):
    from eval.mqar_data import multiquery_ar

    return multiquery_ar(vocab, seq_len, pairs, n, seed, power_a, filler)


def _stage_data(cfg: MQARDataConfig, stage: Stage, seed: int):
    return _generate(cfg.vocab_size, cfg.power_a, cfg.filler, stage.seq_len, stage.num_kv_pairs,
                     stage.num_examples, seed)


def steps_per_epoch(d: MQARDataConfig) -> int:
    return sum(math.ceil(s.num_examples / d.batch_size) for s in d.train)


def _lr(step: int, epoch: int, total: int, o: MQAROptimConfig) -> float:
    """Learning rate at optimizer step ``step`` (of ``total``), in epoch ``epoch`` (both from 0)."""
    if o.schedule == "epoch":
        progress = epoch / o.epochs
    else:
        warmup = int(o.warmup_fraction * total)
        if step < warmup:
            return o.lr * (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_groups(model: torch.nn.Module, o: MQAROptimConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups: ``optim.weight_decay_params`` says which parameters decay."""
    from pretrain.engine import param_groups

    if o.weight_decay_params == "all":
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": o.weight_decay}]
    return param_groups(model, o.weight_decay)


def batches(n: int, batch_size: int, shuffle: torch.Generator | None) -> list[torch.Tensor]:
    """Example indices of one stage's batches for one epoch: in order when ``shuffle`` is None, the last
    batch holding the remainder."""
    order = torch.arange(n) if shuffle is None else torch.randperm(n, generator=shuffle)
    return list(order.split(batch_size))


@dataclass
class TrainLog:
    losses: list[float]  # per optimizer step
    lrs: list[float]  # per optimizer step
    val_average: list[float]  # data.eval average after each epoch (only with optim.early_stop_accuracy)
    epochs: int  # epochs trained (fewer than optim.epochs after an early stop)
    tokens: int  # input tokens trained on
    seconds: float  # wall time of the training loop (data generation excluded)


def train_model(cfg: MQARConfig, desc: str = "mqar") -> tuple[torch.nn.Module, TrainLog]:
    """Train one model on the curriculum; returns it (eval mode) and its log."""
    from tqdm import tqdm

    from models.build import build_model

    torch.manual_seed(cfg.run.seed)
    device, o, d = default_device(), cfg.optim, cfg.data
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(optimizer_groups(model, o), lr=o.lr, betas=tuple(o.betas))
    total = o.epochs * steps_per_epoch(d)
    stages = [_stage_data(d, s, d.seed + i) for i, s in enumerate(d.train)]
    shuffle = torch.Generator().manual_seed(d.seed) if d.shuffle else None
    log = TrainLog([], [], [], 0, 0, 0.0)
    start = time.time()
    with tqdm(total=total, desc=desc, disable=not cfg.progress_bar, dynamic_ncols=True) as bar:
        for epoch in range(o.epochs):
            model.train()
            for inputs, labels in stages:
                for idx in batches(len(inputs), d.batch_size, shuffle):
                    log.lrs.append(_lr(len(log.losses), epoch, total, o))
                    for group in opt.param_groups:
                        group["lr"] = log.lrs[-1]
                    loss = model(inputs[idx].to(device), labels[idx].to(device), return_logits=False).loss
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if o.grad_clip > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
                    opt.step()
                    log.losses.append(loss.item())
                    log.tokens += idx.numel() * inputs.shape[1]
                    bar.update()
                    bar.set_postfix(len=inputs.shape[1], loss=f"{log.losses[-1]:.3f}")
            log.epochs = epoch + 1
            if o.early_stop_accuracy is not None:
                log.val_average.append(evaluate(model, d)["average"])
                bar.set_postfix(epoch=epoch, val=f"{log.val_average[-1]:.4f}")
                if log.val_average[-1] > o.early_stop_accuracy:
                    break
    log.seconds = time.time() - start
    return model.eval(), log


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
    model, log = train_model(cell, desc=cell_name(variant, n_layer))
    result = {
        "variant": variant, "n_layer": n_layer, "params": sum(p.numel() for p in model.parameters()),
        "steps": len(log.losses), "epochs": log.epochs, "final_loss": sum(log.losses[-10:]) / len(log.losses[-10:]),
        "val_average": log.val_average, "train_tokens": log.tokens, "train_seconds": round(time.time() - start, 1),
        "tokens_per_second": round(log.tokens / max(log.seconds, 1e-9)), "device": _device_name(),
        "accuracy": evaluate(model, cell.data),
    }
    write_files({folder / "config.yaml": text_file(yaml.safe_dump(to_dict(cell), sort_keys=False)),
                 folder / "model.pt": lambda p: torch.save({"model_config": to_dict(cell.model),
                                                            "state_dict": model.state_dict()}, p),
                 folder / "result.json": json_file(result)})  # last: its presence marks a finished cell
    return result


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


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


# The paper's Table 2 (Wang et al. 2025; ../shared/PAPER.md): accuracy % at length 1024 with 64/128/256
# KV pairs, and their average. It has no "ones" row at 4 layers.
PAPER_TABLE2: dict[tuple[str, int], list[float]] = {
    ("default", 2): [98.38, 81.81, 36.00, 72.06], ("default", 4): [99.23, 82.08, 33.52, 71.61],
    ("ones", 2): [99.81, 94.70, 56.39, 83.63],
    ("zeros", 2): [98.41, 81.35, 36.55, 72.10], ("zeros", 4): [99.74, 92.20, 52.21, 81.38],
    ("both", 2): [99.23, 95.54, 54.74, 83.17], ("both", 4): [99.94, 98.80, 81.56, 93.43],
}
PAPER_COLUMNS = ["L1024-kv64", "L1024-kv128", "L1024-kv256", "average"]


def paper_comparison(results: list[dict[str, Any]]) -> str:
    """Every cell the paper's Table 2 also has, ours / paper / ours - paper, per column; empty when the
    sweep's eval stages are not the paper's (length 1024 with 64, 128, 256 pairs)."""
    rows = [r for r in results if (r["variant"], r["n_layer"]) in PAPER_TABLE2
            and list(r["accuracy"]) == PAPER_COLUMNS]
    if not rows:
        return ""
    head = ["model", "layers"] + [f"{c.split('-')[-1].replace('kv', 'KV ')} {w}" for c in PAPER_COLUMNS[:3]
                                  for w in ("ours", "paper", "diff")] + ["avg ours", "avg paper", "avg diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for c, paper in zip(PAPER_COLUMNS, PAPER_TABLE2[(r["variant"], r["n_layer"])]):
            ours = 100 * r["accuracy"][c]
            cells += [f"{ours:.2f}", f"{paper:.2f}", f"{ours - paper:+.2f}"]
        lines.append(f"| {r['variant']} | {r['n_layer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def results_markdown(results: list[dict[str, Any]]) -> str:
    """results.md: our table, then the paper comparison when the eval stages are the paper's."""
    comparison = paper_comparison(results)
    beside = f"\nBeside the paper's Table 2 (accuracy %):\n\n{comparison}" if comparison else ""
    return markdown_table(results) + beside


def write_table(cfg: MQARConfig, accuracy: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """Collect every finished cell of the sweep (in config order) into results.json and results.md, with the
    accuracies of a rescoring (cell name -> accuracy) where given."""
    results = [{**json.loads(p.read_text()), **({"accuracy": accuracy[p.parent.name]}
                                                 if accuracy and p.parent.name in accuracy else {})}
               for v in cfg.sweep.variants for n in cfg.sweep.n_layers
               if (p := cfg.run.dir / cell_name(v, n) / "result.json").is_file()]
    if results:
        write_files({cfg.run.dir / "results.json": json_file(results),
                     cfg.run.dir / "results.md": text_file(results_markdown(results))})
    return results


def write_scores(accs: dict[str, float], folder: Path, data: MQARDataConfig) -> Path:
    """A scoring kept beside the earlier ones: ``FOLDER/mqar_eval_<time>.json`` with the stages it used."""
    path = folder / f"mqar_eval_{timestamp()}.json"
    write_files({path: json_file({"accuracy": accs, "eval": [to_dict(s) for s in data.eval], "date": time.time()})})
    return path


def plan(cfg: MQARConfig, variants: list[str] | None = None, layers: list[int] | None = None) -> list[dict[str, Any]]:
    """What each cell costs, without training: parameters, steps, tokens and FLOPs (pretrain.metrics'
    counter: 3x forward for a training token, 1x for an eval token) per epoch and at most (all
    ``optim.epochs``; an early stop ends sooner). Per-epoch scoring is counted only with early stopping."""
    from models.build import build_model
    from pretrain.metrics import forward_flops_per_token

    d, o = cfg.data, cfg.optim
    train_tokens = sum(s.num_examples * s.seq_len for s in d.train)
    eval_tokens = sum(s.num_examples * s.seq_len for s in d.eval)
    rows = []
    for v in variants or cfg.sweep.variants:
        for n in layers or cfg.sweep.n_layers:
            model_cfg = cfg.variant(v, n).model
            with torch.device("meta"):
                params = sum(p.numel() for p in build_model(model_cfg).parameters())
            fwd = forward_flops_per_token(model_cfg)
            epoch_flops = 3 * fwd * train_tokens + (fwd * eval_tokens if o.early_stop_accuracy is not None else 0)
            rows.append({"cell": cell_name(v, n), "params": params, "steps_per_epoch": steps_per_epoch(d),
                         "train_tokens_per_epoch": train_tokens, "flops_per_epoch": epoch_flops,
                         "max_epochs": o.epochs, "max_tokens": o.epochs * train_tokens,
                         "max_flops": o.epochs * epoch_flops + fwd * eval_tokens})
    return rows


def plan_markdown(rows: list[dict[str, Any]]) -> str:
    head = ["cell", "params", "steps/epoch", "train tokens/epoch", "FLOPs/epoch", "max epochs", "max tokens",
            "max FLOPs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['cell']} | {r['params']:,} | {r['steps_per_epoch']:,} | {r['train_tokens_per_epoch']:,} "
                     f"| {r['flops_per_epoch']:.3g} | {r['max_epochs']} | {r['max_tokens']:,} | {r['max_flops']:.3g} |")
    total = sum(r["max_flops"] for r in rows)
    tokens = sum(r["max_tokens"] for r in rows)
    return "\n".join(lines) + f"\n\nall cells: at most {tokens:,} training tokens, {total:.3g} FLOPs\n"


def train_sweep(cfg: MQARConfig, variants: list[str] | None = None, layers: list[int] | None = None,
                force: bool = False) -> list[dict[str, Any]]:
    """Train the chosen cells (default: all), then rewrite the sweep's table; returns its rows."""
    for v in variants or cfg.sweep.variants:
        for n in layers or cfg.sweep.n_layers:
            r = train_cell(cfg, v, n, force)
            print(f"{cell_name(v, n)}: average accuracy {100 * r['accuracy']['average']:.2f}% "
                  f"({r['steps']} steps, {r.get('epochs', '?')} epochs, {r['train_seconds']} s, "
                  f"{r.get('tokens_per_second', 0):,} tokens/s on {r.get('device', '?')})", flush=True)
    return write_table(cfg)


def rescore_sweep(cfg: MQARConfig) -> list[dict[str, Any]]:
    """Score every trained cell of the sweep on ``cfg.data.eval`` again, keep each scoring beside the cell's
    earlier ones (:func:`write_scores`; the training record ``result.json`` stays) and rewrite the table."""
    accuracy = {}
    for v in cfg.sweep.variants:
        for n in cfg.sweep.n_layers:
            folder = cfg.run.dir / cell_name(v, n)
            if (folder / "model.pt").is_file() and (folder / "result.json").is_file():
                accuracy[folder.name] = evaluate(load_cell_model(folder)[0], cfg.data)
                write_scores(accuracy[folder.name], folder, cfg.data)
    results = write_table(cfg, accuracy)
    if not results:
        raise FileNotFoundError(f"no trained cells under {cfg.run.dir}: run `polar mqar train CONFIG` first")
    return results
