"""Mamba-2 interchange with Hugging Face transformers (``Mamba2ForCausalLM``) and mamba_ssm's Mamba-2 folders.

A baseline Mamba2LM's state dict *is* transformers' layout (models/mamba2.py), so it exports as a stock
``mamba2`` checkpoint (vocabulary as padded) and stock checkpoints import with their exact vocabulary
(``pad_vocab_size_multiple: 1``) and head (transformers' Mamba2Config is untied by default). mamba_ssm's
Mamba-2 checkpoints (``ssm_cfg.layer: Mamba2``) use the same names (``backbone.embedding.weight`` aside) and
import too.

A polarized one cannot be a stock checkpoint: transformers' Mamba-2 has one decay per head for all its
state channels, while a polarized head has channels that never decay (A_t ≡ 1) and channels that keep no
memory (A_t ≡ 0) beside the learned ones. It exports with ``model_type: polar_mamba2`` (unknown to
transformers' Auto classes), a ``polar_mamba_note`` saying why, and A_log per head *and state channel*,
``[-inf]*ones ++ [A_log]*N ++ [+inf]*zeros`` (A = -exp(A_log) = -0 and -inf, as the Mamba-1 export), so
forcing it into ``Mamba2ForCausalLM`` fails on A_log's shape instead of computing something else.
"""

from __future__ import annotations

import math
from typing import Any

from models.config import ModelConfig
from models.hf_adapter import HFAdapter, StateDict
from models.hf_ssm import (
    is_mamba_ssm,
    mamba_ssm_fields,
    polar_a_log,
    ssm_config_json,
    ssm_fields_from_json,
    with_our_embedding_name,
)
from models.typed_config import ConfigError

MODEL_TYPE = "mamba2"
POLAR_MODEL_TYPE = "polar_mamba2"
POLAR_NOTE = ("Polarized Mamba-2 (polar-mamba): each head has state channels with A_t = 1 and A_t = 0 beside its "
              "learned ones, and transformers' Mamba2 has one decay per head for all its channels, so stock "
              "transformers cannot load it; load it with polar-mamba's models.hf.from_pretrained.")


def _refuse_dt_clamp(name: str, limit) -> None:
    # transformers 5 writes non-finite floats as {"__float__": "Infinity"} (JSON has no inf)
    if tuple(float(v["__float__"] if isinstance(v, dict) else v) for v in limit) != (0.0, math.inf):
        raise ConfigError(f"Mamba-2 {name} {limit} clamps Δ; polar-mamba's Mamba-2 does not clamp "
                          "(only the default (0, inf) loads)")


class Mamba2Adapter(HFAdapter):
    def config_json(self, cfg: Any) -> dict[str, Any]:
        """transformers' ``Mamba2Config`` fields (stock-loadable for a baseline); a polarized model's type is ours."""
        polar = cfg.polarize.enabled
        return {
            "architectures": ["PolarMamba2ForCausalLM" if polar else "Mamba2ForCausalLM"],
            "model_type": POLAR_MODEL_TYPE if polar else MODEL_TYPE,
            **({"polar_mamba_note": POLAR_NOTE} if polar else {}),
            **ssm_config_json(cfg),
            "num_heads": cfg.n_heads,
            "head_dim": cfg.ssm.head_dim,
            "n_groups": cfg.ssm.n_groups,
            "chunk_size": cfg.ssm.chunk_size,
        }

    def export_state_dict(self, cfg: Any, sd: StateDict) -> StateDict:
        """A polarized model's A_log expanded per state channel (module doc); a baseline's as it is."""
        if not cfg.polarize.enabled:
            return sd
        return {k: polar_a_log(v[:, None].expand(-1, cfg.ssm.d_state), cfg) if k.endswith("mixer.A_log") else v
                for k, v in sd.items()}

    def import_state_dict(self, cfg: Any, sd: StateDict) -> StateDict:
        return {k: v[:, cfg.polarize.ones] if k.endswith("mixer.A_log") and v.dim() == 2 else v
                for k, v in with_our_embedding_name(sd).items()}

    def reads(self, data: dict[str, Any]) -> bool:
        return data.get("model_type") == MODEL_TYPE or is_mamba_ssm(data, "Mamba2")

    def config_from_json(self, data: dict[str, Any]) -> ModelConfig:
        return (config_from_transformers if data.get("model_type") == MODEL_TYPE else config_from_mamba_ssm)(data)

    def stock_class(self, cfg: Any) -> str | None:
        return None if cfg.polarize.enabled else "Mamba2ForCausalLM"


def config_from_transformers(data: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a stock transformers ``Mamba2Config`` (its exact vocabulary: no padding)."""
    _refuse_dt_clamp("time_step_limit", data.get("time_step_limit", (0.0, math.inf)))
    fields = ssm_fields_from_json(data, d_state=128, tied=False)
    if data.get("num_heads", 128) * data.get("head_dim", 64) != fields["d_model"] * fields["ssm"]["expand"]:
        raise ConfigError("Mamba-2 config: num_heads x head_dim must equal expand x hidden_size")
    fields["ssm"].update(head_dim=data.get("head_dim", 64), n_groups=data.get("n_groups", 8),
                         chunk_size=data.get("chunk_size", 256))
    return ModelConfig.from_dict({"arch": "mamba2", **fields})


def config_from_mamba_ssm(data: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from mamba_ssm's ``MambaConfig`` with ``ssm_cfg.layer: Mamba2`` (the state-spaces/mamba2-*
    checkpoints: the same parameter names, ``backbone.embedding.weight``); its options beyond ours are refused."""
    s = data.get("ssm_cfg") or {}
    _refuse_dt_clamp("ssm_cfg.dt_limit", s.get("dt_limit", (0.0, math.inf)))
    extra = {k: s[k] for k in ("d_ssm", "D_has_hdim", "norm_before_gate") if s.get(k)}
    if extra or not s.get("rmsnorm", True):
        raise ConfigError(f"mamba_ssm Mamba2 options {extra or {'rmsnorm': False}} have no polar-mamba equivalent")
    ssm = {"d_state": s.get("d_state", 128), "d_conv": s.get("d_conv", 4), "expand": s.get("expand", 2),
           "head_dim": s.get("headdim", 64), "n_groups": s.get("ngroups", 1), "chunk_size": s.get("chunk_size", 256),
           "conv_bias": s.get("conv_bias", True), "proj_bias": s.get("bias", False)}
    return ModelConfig.from_dict({"arch": "mamba2", **mamba_ssm_fields(data), "ssm": ssm})
