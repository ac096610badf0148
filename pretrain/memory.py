"""Per-GPU memory of a training recipe, estimated from the shapes (``polar plan``): model state by ZeRO
stage, plus the activations one micro-batch keeps for the backward pass.

Model state per parameter (pretrain/engine.py keeps fp32 parameters; bf16 is autocast): parameters 4 B,
gradients 4 B, AdamW moments 8 B. ZeRO-1 splits the moments over the GPUs, ZeRO-2 the gradients too,
ZeRO-3 the parameters too (Rajbhandari et al. 2020, Fig. 1). Activations are counted per token and layer
from the tensors the backward pass needs; it is an estimate (allocator slack, kernels' workspaces and the
CUDA context, ~0.5-1 GiB, are not included).
"""

from __future__ import annotations

from models.config import ModelConfig
from models.registry import get_arch

GIB = 2**30


def activation_elements_per_token(cfg: ModelConfig) -> int:
    """Elements saved for the backward pass per token, all layers: the architecture's own count
    (models/archs.py), from the tensors its backward pass needs."""
    return get_arch(cfg.arch).activations_per_token(cfg)


def per_gpu_memory(cfg: ModelConfig, params: int, zero_stage: int, gpus: int, micro_batch: int, seq_len: int,
                   dtype: str) -> dict[str, float]:
    """Bytes per GPU: {"params", "grads", "optimizer", "activations", "total"}."""
    split = {name: (gpus if zero_stage >= stage else 1) for name, stage in
             (("optimizer", 1), ("grads", 2), ("params", 3))}
    out = {
        "params": 4 * params / split["params"],
        "grads": 4 * params / split["grads"],
        "optimizer": 8 * params / split["optimizer"],
        "activations": (2 if dtype == "bf16" else 4) * micro_batch * seq_len * activation_elements_per_token(cfg),
    }
    out["total"] = sum(out.values())
    return out
