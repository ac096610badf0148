"""Chinchilla budgeting (tokens -> optimizer steps) and the learning-rate schedules (cosine, WSD, constant).

Budget: tokens = schedule.tokens, else tokens_per_param x parameters (Hoffmann et al. 2022: ~20);
steps = schedule.steps, else ceil(tokens / tokens per optimizer step). The seed's Table 4 recipes fix
the steps directly (configs/chinchilla-*.yaml).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pretrain.config import TrainConfig


@dataclass(frozen=True)
class Budget:
    params: int
    tokens_per_step: int
    steps: int
    warmup_steps: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params


def make_budget(cfg: TrainConfig, params: int) -> Budget:
    s = cfg.schedule
    tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
    if s.steps is not None:
        steps = s.steps
    else:
        tokens = s.tokens if s.tokens is not None else s.tokens_per_param * params
        steps = max(1, math.ceil(tokens / tokens_per_step))
    warmup = s.warmup_steps if s.warmup_steps is not None else round(s.warmup_fraction * steps)
    return Budget(params=params, tokens_per_step=tokens_per_step, steps=steps, warmup_steps=min(warmup, steps))


def lr_at(step: int, cfg: TrainConfig, budget: Budget) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from ~0 to the peak, then
    cosine decay to the floor (``cosine``), a plateau and a final cosine decay (``wsd``: warmup-stable-
    decay, Hu et al. 2024), or the peak held (``constant``)."""
    peak, floor = cfg.optim.lr, cfg.optim.lr * cfg.optim.min_lr_ratio
    W, T = budget.warmup_steps, budget.steps
    if step < W:
        return peak * (step + 1) / W
    if cfg.schedule.kind == "constant":
        return peak
    decay_start = W if cfg.schedule.kind == "cosine" else max(W, T - round(cfg.schedule.decay_fraction * T))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, T - 1 - decay_start))
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def plan(cfg: TrainConfig, mfu: float, gpu: str, gpus: int) -> dict:
    """Budget and cost estimate of a recipe (parameters counted on the meta device)."""
    import torch

    from models.build import build_model
    from pretrain.metrics import peak_flops, train_flops_per_token

    with torch.device("meta"):
        params = build_model(cfg.model).num_parameters()
    b = make_budget(cfg, params)
    flops = train_flops_per_token(cfg.model) * b.tokens
    peak = peak_flops(gpu, "fp32" if cfg.precision.dtype == "fp32" else "bf16")  # auto: bf16 on these GPUs
    if peak is None:
        raise ValueError(f"unknown GPU '{gpu}': use one of H100, H200, A100, L40S, A10G, V100")
    hours = flops / (peak * mfu) / 3600
    return {
        "params": params, "tokens": b.tokens, "steps": b.steps, "tokens_per_step": b.tokens_per_step,
        "tokens_per_param": b.tokens_per_param, "warmup_steps": b.warmup_steps, "train_flops": flops,
        "gpu_hours": hours, "wall_hours": hours / gpus, "gpu": gpu, "mfu": mfu, "gpus": gpus,
    }

