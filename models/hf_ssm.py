"""What the SSM family's Hugging Face adapters (Mamba-1, Mamba-2) share: the config.json fields transformers'
Mamba and Mamba2 configs have in common, the ``ssm`` fields read back from them, mamba_ssm's embedding name,
and the export of polar channels through A_log.

Stock transformers has no polar channels; a channel with A_log = -inf has A = -exp(A_log) = -0 and one with
A_log = +inf has A = -inf, so exp(Δ·A) is exactly 1 and 0 in its forward pass (DESIGN §2).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from models.hf_adapter import StateDict

MAMBA_SSM_EMBEDDING = "backbone.embedding.weight"  # mamba_ssm's name for transformers' backbone.embeddings.weight


def ssm_config_json(cfg: Any) -> dict[str, Any]:
    """The fields of transformers' MambaConfig and Mamba2Config that mean the same in both."""
    s = cfg.ssm
    return {
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "state_size": cfg.d_state_total,
        "expand": s.expand,
        "conv_kernel": s.d_conv,
        "use_bias": s.proj_bias,
        "use_conv_bias": s.conv_bias,
        "hidden_act": "silu",
        "layer_norm_epsilon": cfg.norm_eps,
        "residual_in_fp32": cfg.residual_in_fp32,
        "initializer_range": cfg.initializer_range,
        "time_step_min": s.dt_min,
        "time_step_max": s.dt_max,
        "time_step_floor": s.dt_init_floor,
        # An init-only setting; transformers 5 re-applies it to loaded out_proj weights, so keep it off.
        "rescale_prenorm_residual": False,
        "use_cache": True,
    }


def ssm_fields_from_json(data: dict[str, Any], d_state: int, tied: bool) -> dict[str, Any]:
    """The ModelConfig fields a stock transformers Mamba/Mamba2 config.json gives, with its exact vocabulary
    (no padding) and its class's default for tie_word_embeddings; ``ssm`` holds the shared SSM fields."""
    return {
        "d_model": data["hidden_size"], "n_layer": data["num_hidden_layers"],
        "vocab_size": data["vocab_size"], "pad_vocab_size_multiple": 1,
        "norm_eps": data.get("layer_norm_epsilon", 1e-5), "residual_in_fp32": data.get("residual_in_fp32", True),
        "tie_embeddings": data.get("tie_word_embeddings", tied),
        "ssm": {"d_state": data.get("state_size", d_state), "d_conv": data.get("conv_kernel", 4),
                "expand": data.get("expand", 2), "conv_bias": data.get("use_conv_bias", True),
                "proj_bias": data.get("use_bias", False)},
    }


def is_mamba_ssm(data: dict[str, Any], layer: str) -> bool:
    """Whether config.json is mamba_ssm's MambaConfig with mixer ``layer`` (Mamba1 when unnamed)."""
    return "d_model" in data and "n_layer" in data and (data.get("ssm_cfg") or {}).get("layer", "Mamba1") == layer


def mamba_ssm_fields(data: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields outside ``ssm`` of mamba_ssm's MambaConfig (either mixer layer)."""
    return {"d_model": data["d_model"], "n_layer": data["n_layer"], "vocab_size": data["vocab_size"],
            "pad_vocab_size_multiple": data.get("pad_vocab_size_multiple", 8),
            "residual_in_fp32": data.get("residual_in_fp32", True), "tie_embeddings": data.get("tie_embeddings", True)}


def polar_a_log(learned: torch.Tensor, cfg: Any, zero_value: float = math.inf) -> torch.Tensor:
    """``[-inf]*ones ++ learned ++ [zero_value]*zeros`` along the last dim (learned: (rows, N))."""
    rows = learned.shape[0]
    return torch.cat([learned.new_full((rows, cfg.polarize.ones), -math.inf), learned,
                      learned.new_full((rows, cfg.polarize.zeros), zero_value)], dim=1)


def with_our_embedding_name(sd: StateDict) -> StateDict:
    return {k.replace(MAMBA_SSM_EMBEDDING, "backbone.embeddings.weight"): v for k, v in sd.items()}
