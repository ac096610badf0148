"""TrainConfig: the one typed config tree behind `polar train` / `polar plan` (YAML + dotted overrides).

Sections: run, model, data, optim, schedule, distributed, precision, checkpoint, logging, eval.
``model`` may name a preset (``model: {preset: mamba-130m, n_layer: 12}``): the preset's fields are the
base and the rest override them; the resolved config (saved in the run directory) has no preset key.

``RUN/config.yaml`` is the run's current recipe plus its ``history``: one entry (step, key, was, now) per key a
resume changed (:func:`recipe_changes`); the history is not part of the recipe and is ignored when the file is
loaded (so ``polar train RUN/config.yaml`` runs as written).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from models.config import PRESETS, ModelConfig
from models.typed_config import (
    ConfigError,
    _suggest,
    apply_overrides,
    bounded,
    differences,
    from_dict,
    load_yaml,
    to_dict,
)

HISTORY_KEY = "history"  # RUN/config.yaml: the changes made on resume, not part of the recipe


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run directory is out_dir/name
    seed: int = bounded(1234, ge=0)

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class SourceConfig:
    """One source of a weighted mixture (pretrain/mixture.py): windows are drawn from it in proportion to weight."""

    path: str  # a folder written by `polar prepare`
    weight: float = bounded(1.0, gt=0)  # relative: the weights are normalised over the sources
    name: str | None = None  # its name in metrics and reports; default: the folder's name

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


DEFAULT_DATA_PATH = "data/shakespeare"


@dataclass
class DataConfig:
    path: str | None = DEFAULT_DATA_PATH  # a folder written by `polar prepare` (one source)
    sources: list[SourceConfig] = field(default_factory=list)  # a mixture instead of path: [{path, weight, name}]
    tokenizer: str | None = None  # checked against the data's fingerprint when given
    seq_len: int = bounded(1024, gt=0)
    micro_batch_size: int = bounded(8, gt=0)  # sequences per process per micro-step
    global_batch_size: int = bounded(64, gt=0)  # sequences per optimizer step (all processes, all micro-steps)
    verify_checksums: bool = False  # sha256 every shard at start (slow for large data)
    # carry: packed documents pass state into each other (mamba_ssm, the paper). reset: every layer starts each
    # document from a zero state (kernels/documents.py); needs data with document indexes and a model that resets
    document_boundaries: Literal["carry", "reset"] = "carry"

    def __post_init__(self):
        if self.sources and self.path not in (None, DEFAULT_DATA_PATH):
            raise ConfigError("data.path and data.sources are both set: a mixture lists every folder in data.sources "
                              "(set data.path: null)")
        if not self.sources and self.path is None:
            raise ConfigError("data.path is null and data.sources is empty: name the prepared data")

    def source_list(self) -> list[SourceConfig]:
        """The sources to train on: ``sources``, or ``path`` as the one source of weight 1."""
        return self.sources or [SourceConfig(self.path)]


@dataclass
class OptimConfig:
    lr: float = bounded(3e-3, gt=0)  # peak learning rate
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)  # floor = lr * min_lr_ratio
    betas: list[float] = bounded(default_factory=lambda: [0.9, 0.95], ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    weight_decay: float = bounded(0.1, ge=0)  # not applied to norms, biases, A_log, D
    grad_clip: float = bounded(1.0, ge=0)  # 0: no clipping

    def __post_init__(self):
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must have two values, got {self.betas}")


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    steps: int | None = bounded(None, gt=0)  # explicit optimizer steps; else derived from tokens
    tokens: int | None = bounded(None, gt=0)  # explicit token budget; else tokens_per_param x params (Chinchilla)
    tokens_per_param: float = bounded(20.0, gt=0)
    warmup_steps: int | None = bounded(None, ge=0)  # default: warmup_fraction of the steps
    warmup_fraction: float = bounded(0.01, ge=0, lt=1)
    decay_fraction: float = bounded(0.2, gt=0, le=1)  # WSD: the final fraction of steps that decays to the floor

    def __post_init__(self):
        if self.steps is not None and self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ConfigError(f"schedule.warmup_steps ({self.warmup_steps}) exceeds schedule.steps ({self.steps})")


@dataclass
class DistributedConfig:
    zero_stage: int = bounded(2, ge=0, le=3)
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU
    deepspeed: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed JSON, merged over ours


@dataclass
class PrecisionConfig:
    # bf16: fp32 master parameters, bf16 autocast compute (how mamba_ssm's authors train; keeps A_log,
    # D and the Δ bias in fp32 — see docs/training.md). fp32: everything in fp32.
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on a GPU that has it, else fp32


def resolve_precision(dtype: str, device_type: str) -> str:
    """``auto`` -> bf16 on a CUDA device that supports it, fp32 elsewhere (bf16 autocast on CPU ran ~5x slower
    than fp32 here); an explicit choice stays."""
    if dtype != "auto":
        return dtype
    import torch

    return "bf16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


@dataclass
class CheckpointConfig:
    every: int = bounded(500, gt=0)  # optimizer steps; a checkpoint is also written at the end and on SIGTERM/SIGUSR1
    keep_last: int = bounded(3, gt=0)  # most recent tags of the run's lineage kept (docs/training.md)


@dataclass
class LoggingConfig:
    every: int = bounded(10, gt=0)  # steps between console/JSONL lines (JSONL gets every step when 1)
    wandb: Literal["disabled", "offline", "online"] = "disabled"
    wandb_project: str = "polar-mamba"
    wandb_entity: str | None = None  # team or user (default: wandb's own default)
    wandb_group: str | None = None  # groups runs in the wandb UI, e.g. one per sweep
    wandb_tags: list[str] = field(default_factory=list)
    sample_prompt: str | None = None  # end-of-run sample; default: the first line of the first validation document
    progress_bar: bool = True
    max_nonfinite_steps: int = bounded(5, gt=0)  # this many non-finite steps in a row stop the run


@dataclass
class EvalConfig:
    every: int = bounded(500, ge=0)  # optimizer steps between validation passes (0: only at the end)
    batches: int = bounded(8, gt=0)  # micro-batches per process per validation pass


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _expand_model_preset(data: dict[str, Any]) -> dict[str, Any]:
    model = data.get("model")
    if not isinstance(model, dict) or "preset" not in model:
        return data
    rest = {k: v for k, v in model.items() if k != "preset"}
    name = model["preset"]
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset '{name}': {_suggest(name, list(PRESETS))}")
    base = apply_overrides(PRESETS[name], {})
    merged = apply_overrides(base, _flatten(rest))
    return {**data, "model": merged}


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def build_config(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A validated TrainConfig from a nested dict plus dotted overrides."""
    merged = apply_overrides(data, overrides or {})
    return from_dict(TrainConfig, _expand_model_preset(_vocab_from_tokenizer(merged)))


def _vocab_from_tokenizer(data: dict[str, Any]) -> dict[str, Any]:
    """model.vocab_size, when neither the recipe nor its preset sets it, is data.tokenizer's vocabulary."""
    model, tok = data.get("model"), (data.get("data") or {}).get("tokenizer")
    if not isinstance(model, dict) or "vocab_size" in model or "vocab_size" in PRESETS.get(model.get("preset"), {}):
        return data
    meta = Path(str(tok)) / "polar_tokenizer.json"
    if not tok or not meta.is_file():
        return data
    return {**data, "model": {**model, "vocab_size": json.loads(meta.read_text())["vocab_size"]}}


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a YAML recipe (``configs/*.yaml``, or a run's config.yaml without its history) and apply dotted
    overrides (``{"optim.lr": 1e-3}``)."""
    data = load_yaml(path)
    data.pop(HISTORY_KEY, None)
    return build_config(data, overrides)


def recipe_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, the checkpoint's value, this run's value) for every key a resume changed. The model is not among
    them: pretrain/checkpoint.py refuses a resume that changes it (and the tokenizer)."""
    return [d for d in differences(saved, now) if not d[0].startswith("model.")]


def run_config_yaml(cfg: TrainConfig, path: Path, step: int, changes: list[tuple[str, Any, Any]]) -> str:
    """config.yaml's text: the recipe, then the history kept in ``path`` before ``step`` plus ``changes`` at
    ``step`` (a resume from the same step again replaces what an earlier attempt recorded there)."""
    old = (load_yaml(path).get(HISTORY_KEY) or []) if path.is_file() else []
    history = [h for h in old if h["step"] < step] + [{"step": step, "key": k, "was": was, "now": now}
                                                      for k, was, now in changes]
    return cfg.to_yaml() + (yaml.safe_dump({HISTORY_KEY: history}, sort_keys=False) if history else "")
