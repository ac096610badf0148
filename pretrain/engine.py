"""DeepSpeed engine construction: distributed init, the generated DeepSpeed JSON, AdamW param groups.

Precision: the engine always holds fp32 parameters; ``precision.dtype: bf16`` runs the forward pass
under bf16 autocast (the trainer's job). That is AMP with fp32 master weights, the way mamba_ssm's
authors train, and it keeps A_log, D and the Δ bias in fp32 where bf16 would round them (docs/training.md).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch

from pretrain.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cfg: TrainConfig) -> DistEnv:
    """Join the process group started by torchrun / the deepspeed launcher / srun (or make a world of 1)."""
    from pretrain.console import import_deepspeed

    deepspeed = import_deepspeed()

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    backend = cfg.distributed.backend if cfg.distributed.backend != "auto" else ("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(local_rank)
    else:
        # skips a ~40 s JIT build of DeepSpeed's shared-memory comm op that CPU gloo runs don't need
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return DistEnv(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def grad_accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.data.micro_batch_size * world_size
    if cfg.data.global_batch_size % per_step:
        raise ValueError(
            f"data.global_batch_size={cfg.data.global_batch_size} is not a multiple of micro_batch_size x processes "
            f"= {cfg.data.micro_batch_size} x {world_size}: change one of them"
        )
    return cfg.data.global_batch_size // per_step


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run; ``distributed.deepspeed`` entries override ours."""
    ds = {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": grad_accumulation_steps(cfg, world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.distributed.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW on CPU
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, cfg.distributed.deepspeed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on norms and biases (1-D) nor on A_log and D (flagged by the model)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_engine(cfg: TrainConfig, model: torch.nn.Module, env: DistEnv, load_universal: bool = False):
    """Wrap ``model`` in a DeepSpeed engine with AdamW (FusedAdam on CUDA, torch AdamW on CPU).
    ``load_universal``: the resume checkpoint is in DeepSpeed's universal format (a world-size change)."""
    import deepspeed

    if cfg.distributed.zero_stage == 3:
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for module, param in model.borrowed_parameters():
            register_external_parameter(module, param)
    groups = param_groups(model, cfg.optim.weight_decay)
    kw = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if env.device.type == "cuda":
        from deepspeed.ops.adam import FusedAdam

        optimizer = FusedAdam(groups, adam_w_mode=True, **kw)
    else:
        # DeepSpeed's own CPU Adam compiles a C++ op (~2 min); torch's AdamW needs nothing.
        optimizer = torch.optim.AdamW(groups, **kw)
    ds_config = deepspeed_config(cfg, env.world_size)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, *_ = deepspeed.initialize(model=model.to(env.device), optimizer=optimizer, config=ds_config)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
