"""Mamba-2 interchange with Hugging Face transformers (``Mamba2ForCausalLM``); :mod:`models.hf` hands Mamba-2
models and configs here and keeps the folder format (config.json + safetensors, our config under
``polar_mamba``).

A baseline Mamba2LM's state dict *is* transformers' layout (models/mamba2.py), so it exports as a stock
``mamba2`` checkpoint (head tied, vocabulary as padded) and stock checkpoints import with their exact
vocabulary (``pad_vocab_size_multiple: 1``). mamba_ssm's Mamba-2 checkpoints (``ssm_cfg.layer: Mamba2``) use
the same names (``backbone.embedding.weight`` aside) and import too.

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

import torch

from models.config import ModelConfig
from models.typed_config import ConfigError

MODEL_TYPE = "mamba2"
POLAR_MODEL_TYPE = "polar_mamba2"
POLAR_NOTE = ("Polarized Mamba-2 (polar-mamba): each head has state channels with A_t = 1 and A_t = 0 beside its "
              "learned ones, and transformers' Mamba2 has one decay per head for all its channels, so stock "
              "transformers cannot load it; load it with polar-mamba's models.hf.from_pretrained.")


def hf_config(cfg: ModelConfig, special_ids: dict[str, int], config_key: str) -> dict[str, Any]:
    """config.json: transformers' ``Mamba2Config`` fields (stock-loadable for a baseline) plus our config."""
    s, polar = cfg.ssm, cfg.polarize.enabled
    return {
        "architectures": ["PolarMamba2ForCausalLM" if polar else "Mamba2ForCausalLM"],
        "model_type": POLAR_MODEL_TYPE if polar else MODEL_TYPE,
        **({"polar_mamba_note": POLAR_NOTE} if polar else {}),
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "expand": s.expand,
        "num_heads": cfg.n_heads,
        "head_dim": s.head_dim,
        "n_groups": s.n_groups,
        "state_size": cfg.d_state_total,
        "conv_kernel": s.d_conv,
        "chunk_size": s.chunk_size,
        "use_bias": s.proj_bias,
        "use_conv_bias": s.conv_bias,
        "hidden_act": "silu",
        "layer_norm_epsilon": cfg.norm_eps,
        "residual_in_fp32": cfg.residual_in_fp32,
        "initializer_range": cfg.initializer_range,
        "time_step_min": s.dt_min,
        "time_step_max": s.dt_max,
        "time_step_floor": s.dt_init_floor,
        "rescale_prenorm_residual": False,  # init-only; transformers would re-apply it to loaded weights
        "tie_word_embeddings": True,
        "use_cache": True,
        **special_ids,
        config_key: cfg.to_dict(),
    }


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """Our tensors without the tied head; a polarized model's A_log expanded per state channel (module doc)."""
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.endswith("mixer.A_log") and cfg.polarize.enabled:
            t = torch.cat([t.new_full((t.shape[0], cfg.polarize.ones), -math.inf),
                           t[:, None].expand(-1, cfg.ssm.d_state),
                           t.new_full((t.shape[0], cfg.polarize.zeros), math.inf)], dim=1)
        out[name] = t.detach().contiguous()
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state_dict`; a stock checkpoint's separate head must equal the embedding."""
    out = {}
    for name, t in sd.items():
        if name.endswith("mixer.A_log") and t.dim() == 2:
            t = t[:, cfg.polarize.ones]
        out[name.replace("backbone.embedding.weight", "backbone.embeddings.weight")] = t
    emb = out["backbone.embeddings.weight"]
    if "lm_head.weight" in out and not torch.equal(out["lm_head.weight"], emb):
        raise ConfigError("this Mamba-2 checkpoint has an untied lm_head; polar-mamba ties the head to the "
                          "embedding (model.tie_embeddings), so it cannot be loaded exactly")
    out["lm_head.weight"] = emb
    return out


def _refuse_dt_clamp(name: str, limit) -> None:
    # transformers 5 writes non-finite floats as {"__float__": "Infinity"} (JSON has no inf)
    if tuple(float(v["__float__"] if isinstance(v, dict) else v) for v in limit) != (0.0, math.inf):
        raise ConfigError(f"Mamba-2 {name} {limit} clamps Δ; polar-mamba's Mamba-2 does not clamp "
                          "(only the default (0, inf) loads)")


def config_from_json(data: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a stock transformers ``Mamba2Config`` (its exact vocabulary: no padding)."""
    _refuse_dt_clamp("time_step_limit", data.get("time_step_limit", (0.0, math.inf)))
    hidden, expand = data["hidden_size"], data.get("expand", 2)
    if data.get("num_heads", 128) * data.get("head_dim", 64) != hidden * expand:
        raise ConfigError("Mamba-2 config: num_heads x head_dim must equal expand x hidden_size")
    ssm = {
        "d_state": data.get("state_size", 128), "d_conv": data.get("conv_kernel", 4), "expand": expand,
        "head_dim": data.get("head_dim", 64), "n_groups": data.get("n_groups", 8),
        "chunk_size": data.get("chunk_size", 256), "conv_bias": data.get("use_conv_bias", True),
        "proj_bias": data.get("use_bias", False),
    }
    return ModelConfig.from_dict({
        "arch": "mamba2", "d_model": hidden, "n_layer": data["num_hidden_layers"],
        "vocab_size": data["vocab_size"], "pad_vocab_size_multiple": 1,
        "norm_eps": data.get("layer_norm_epsilon", 1e-5), "residual_in_fp32": data.get("residual_in_fp32", True),
        "ssm": ssm,
    })


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
    return ModelConfig.from_dict({
        "arch": "mamba2", "d_model": data["d_model"], "n_layer": data["n_layer"], "vocab_size": data["vocab_size"],
        "pad_vocab_size_multiple": data.get("pad_vocab_size_multiple", 8),
        "residual_in_fp32": data.get("residual_in_fp32", True), "ssm": ssm,
    })
