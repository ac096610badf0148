"""A Llama-style Transformer LM: the attention baseline beside Mamba (paper Fig. 5, MQAR comparisons).

RoPE (half-rotation pairs), pre-norm RMSNorm, SwiGLU MLP, causal attention through flash-attn (CUDA, half
precision, when importable) or ``scaled_dot_product_attention``. Its config (:class:`TransformerConfig`:
``n_head``, ``d_ff``, ``rope_theta``) and its block (attention ``.mixer`` with a KV cache as the inference
state, then the MLP); embedding, head, loss and decoding are the skeleton's (:mod:`models.lm`). The layout is
Llama's up to names and the fused q/k/v projection (:mod:`models.hf_llama` converts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.config import ModelConfig
from models.layers import LayerStateBase, RMSNorm
from models.lm import CausalLM, Mixer
from models.typed_config import ConfigError, bounded


@dataclass
class TransformerConfig(ModelConfig):
    arch: str = "transformer"
    n_head: int = bounded(4, gt=0)
    d_ff: int | None = bounded(None, gt=0)  # SwiGLU hidden size; None: Llama's 8/3 x d_model, rounded up to 8s
    rope_theta: float = bounded(10000.0, gt=0)

    def __post_init__(self):
        super().__post_init__()
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ConfigError(f"model.n_head must divide d_model into an even head size (RoPE rotates pairs), "
                              f"got d_model={self.d_model}, n_head={self.n_head}")

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or (8 * self.d_model // 3 + 7) // 8 * 8

    @property
    def d_model_multiple(self) -> int:
        return math.lcm(8, 2 * self.n_head)  # whole heads of an even size


def _flash_attn():
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func
    except ImportError:
        return None


def rope_tables(seq_len: int, head_dim: int, theta: float, device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (seq_len, head_dim/2) of RoPE (Su et al. 2021) for positions start..start+seq_len-1: pair i
    rotates by t·theta^(-2i/head_dim)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, L, h, head_dim), rotated in fp32 over (first half, second half) pairs (Llama's layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


@dataclass
class KVCache(LayerStateBase):
    """Keys and values (b, n_head, T, head_dim) of the T positions one attention layer has seen."""

    k: torch.Tensor
    v: torch.Tensor


class Attention(Mixer):
    """Causal multi-head self-attention with RoPE; with ``seq_idx``, intra-document (a query sees only keys of its
    own packed document, as Llama 3 and OLMo-core mask packed pretraining windows)."""

    document_resets = True

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_head, self.head_dim, self.theta = cfg.n_head, cfg.d_model // cfg.n_head, cfg.rope_theta
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, L, d_model). With ``cache``, x continues the cached positions, and its keys and values are
        appended to the cache. ``seq_idx`` (b, L) (training, no cache): attention within each document only."""
        if seq_idx is not None and cache is not None:
            raise ValueError("document masking (seq_idx) is for training windows, not with a KV cache")
        b, L, d = x.shape
        past = 0 if cache is None else cache.k.shape[2]
        q, k, v = self.qkv_proj(x).view(b, L, 3, self.n_head, self.head_dim).unbind(2)
        cos, sin = rope_tables(L, self.head_dim, self.theta, x.device, start=past)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        flash = _flash_attn() if x.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
        if flash is not None and cache is None and seq_idx is None:
            return self.o_proj(flash(q, k, v, causal=True).reshape(b, L, d))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, h, L, head_dim)
        mask = None
        if seq_idx is not None:  # causal and same document; (b, 1, L, L) broadcast over heads
            mask = (seq_idx[:, None, :, None] == seq_idx[:, None, None, :]) & torch.ones(
                L, L, dtype=torch.bool, device=x.device).tril()
        if cache is not None:
            k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
            cache.k, cache.v = k, v
            if past and L > 1:  # query i (position past + i) sees keys 0..past + i
                mask = torch.ones(L, past + L, dtype=torch.bool, device=x.device).tril(past)
        causal = mask is None and L > 1 and past == 0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, d))

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """An empty cache; it grows by one position per token fed."""
        empty = torch.zeros(batch, self.n_head, 0, self.head_dim, device=device, dtype=dtype)
        return KVCache(empty, empty.clone())


class SwiGLU(nn.Module):
    """down(SiLU(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Attention then MLP, pre-norm, in MambaBlock's (hidden, residual) form: the new residual stream is
    hidden + residual; returns (mlp output, stream after attention), whose sum is the block's output."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, cache: KVCache | None = None,
                **documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed, stream = self.norm(hidden, residual)
        normed, stream = self.mlp_norm(self.mixer(normed.to(hidden.dtype), cache, **documents), stream)
        return self.mlp(normed.to(hidden.dtype)), stream

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) everywhere, residual output projections scaled by 1/sqrt(2·n_layer) (GPT-2:
        two residual additions per layer)."""
        std = self.cfg.initializer_range
        for lin in (self.mixer.qkv_proj, self.mlp.gate_proj, self.mlp.up_proj):
            nn.init.normal_(lin.weight, std=std)
        for lin in (self.mixer.o_proj, self.mlp.down_proj):
            nn.init.normal_(lin.weight, std=std / math.sqrt(2 * self.cfg.n_layer))


class TransformerLM(CausalLM):
    """Llama-style causal LM: the skeleton over :class:`TransformerBlock` layers (a KV cache as the state)."""

    block = TransformerBlock
