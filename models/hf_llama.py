"""Transformer interchange with transformers' ``LlamaForCausalLM``.

Our Transformer is Llama's architecture: pre-norm RMSNorm (weight times the fp32-normalised input), RoPE
over (first half, second half) pairs with inv_freq = theta^(-2i/head_dim), causal attention scaled by
1/sqrt(head_dim), SwiGLU MLP, no biases. Two things differ and are converted: the names
(``backbone.layers.{i}.mixer`` is ``model.layers.{i}.self_attn``, ...) and our fused q/k/v projection
(``qkv_proj.weight`` is q_proj, k_proj and v_proj stacked). Llama options we do not have (grouped-query
attention, biases, RoPE scaling, another activation or head size) are refused on import. One numeric
difference remains in half precision: our residual stream is fp32 (as Mamba's), Llama's is in the model
dtype; in fp32 the logits agree.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from models.config import ModelConfig
from models.hf_adapter import HFAdapter, StateDict
from models.typed_config import ConfigError

MODEL_TYPE = "llama"
# (ours, transformers') name prefixes; {i} is the layer index
RENAMES = [
    ("backbone.embeddings.", "model.embed_tokens."),
    ("backbone.norm_f.", "model.norm."),
    ("backbone.layers.{i}.norm.", "model.layers.{i}.input_layernorm."),
    ("backbone.layers.{i}.mlp_norm.", "model.layers.{i}.post_attention_layernorm."),
    ("backbone.layers.{i}.mixer.", "model.layers.{i}.self_attn."),
    ("backbone.layers.{i}.mlp.", "model.layers.{i}.mlp."),
]
QKV = ("q_proj", "k_proj", "v_proj")


def _rename(name: str, to_llama: bool) -> str:
    layer = re.match(r"(?:backbone|model)\.layers\.(\d+)\.", name)
    for ours, theirs in RENAMES:
        src, dst = ((ours, theirs) if to_llama else (theirs, ours))
        src, dst = (p.format(i=layer[1] if layer else "") for p in (src, dst))
        if name.startswith(src):
            return dst + name[len(src):]
    return name


def _rope_theta(data: dict[str, Any]) -> float:
    """RoPE base of a Llama config.json (transformers 5: ``rope_parameters``; older: ``rope_theta``); other kinds
    of RoPE (scaled, YaRN, ...) are refused."""
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"Llama rope {rope} is not plain RoPE; polar-mamba's Transformer has no RoPE scaling")
    return float(rope.get("rope_theta", data.get("rope_theta", 10000.0)))


class LlamaAdapter(HFAdapter):
    def config_json(self, cfg: Any) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": MODEL_TYPE,
            "vocab_size": cfg.padded_vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_dim,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_head,
            "head_dim": cfg.d_model // cfg.n_head,
            "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "max_position_embeddings": 1 << 16,  # RoPE has no length limit; transformers wants a number
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": cfg.initializer_range,
            "use_cache": True,
        }

    def export_state_dict(self, cfg: Any, sd: StateDict) -> StateDict:
        out = {}
        for name, t in sd.items():
            new = _rename(name, to_llama=True)
            if new.endswith("self_attn.qkv_proj.weight"):
                out.update({new.replace("qkv_proj", p): w for p, w in zip(QKV, t.chunk(3, dim=0))})
            else:
                out[new] = t
        return out

    def import_state_dict(self, cfg: Any, sd: StateDict) -> StateDict:
        out = {_rename(name, to_llama=False): t for name, t in sd.items()}
        for name in [n for n in out if n.endswith("mixer.q_proj.weight")]:
            stem = name.removesuffix("q_proj.weight")
            out[stem + "qkv_proj.weight"] = torch.cat([out.pop(stem + p + ".weight") for p in QKV])
        return out

    def reads(self, data: dict[str, Any]) -> bool:
        return data.get("model_type") == MODEL_TYPE

    def config_from_json(self, data: dict[str, Any]) -> ModelConfig:
        d, heads = data["hidden_size"], data["num_attention_heads"]
        unsupported = {k: data[k] for k in ("attention_bias", "mlp_bias") if data.get(k)}
        if data.get("num_key_value_heads", heads) != heads:
            unsupported["num_key_value_heads"] = data["num_key_value_heads"]
        if data.get("head_dim", d // heads) != d // heads:
            unsupported["head_dim"] = data["head_dim"]
        if data.get("hidden_act", "silu") != "silu":
            unsupported["hidden_act"] = data["hidden_act"]
        if unsupported:
            raise ConfigError(f"Llama options {unsupported} have no polar-mamba equivalent (plain multi-head "
                              "attention, no biases, SiLU, head_dim = hidden_size / heads)")
        return ModelConfig.from_dict({
            "arch": "transformer", "d_model": d, "n_layer": data["num_hidden_layers"], "n_head": heads,
            "d_ff": data["intermediate_size"], "rope_theta": _rope_theta(data),
            "vocab_size": data["vocab_size"], "pad_vocab_size_multiple": 1,
            "norm_eps": data.get("rms_norm_eps", 1e-6), "tie_embeddings": data.get("tie_word_embeddings", False),
            "initializer_range": data.get("initializer_range", 0.02),
        })

    def stock_class(self, cfg: Any) -> str | None:
        return "LlamaForCausalLM"
