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

GIB = 2**30


def activation_elements_per_token(cfg: ModelConfig) -> int:
    """Elements saved for the backward pass per token, all layers. Mamba, per layer: the block input and
    norm output (2d), in_proj's x and z (2Ed), the conv output and its SiLU (2Ed), x_proj's output
    (R + 2N), Δ (Ed), the scan output and the gated product (2Ed). Transformer (SwiGLU hidden f): block
    input and norm (2d), q, k, v (3d), attention output (d), residual and MLP norm (2d), gate, up, SiLU(gate)
    and their product (4f); attention scores are not stored (fused attention)."""
    d = cfg.d_model
    if cfg.arch == "transformer":
        per_layer = 8 * d + 4 * cfg.ffn_dim
    else:
        per_layer = 2 * d + 7 * cfg.d_inner + cfg.dt_rank + 2 * cfg.d_state_total
    return cfg.n_layer * per_layer + 2 * d  # + embedding output and final norm


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
