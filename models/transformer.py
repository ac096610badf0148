"""A Llama-style Transformer LM: the attention baseline beside Mamba (paper Fig. 5, MQAR comparisons).

RoPE, pre-norm RMSNorm, SwiGLU MLP, causal attention through flash-attn (CUDA, half precision, when
importable) or ``scaled_dot_product_attention``. It mirrors MambaLM so every tool takes either: the same
``ModelConfig`` (``arch: transformer``), the same state-dict layout (``backbone.embeddings``,
``backbone.layers.{i}.{norm,mixer,mlp_norm,mlp}``, ``backbone.norm_f``, tied ``lm_head``), blocks that
pass (hidden, residual) with ``.mixer`` as the sequence-mixing layer, ``forward`` -> ``LMOutput``, and
inference states (here a per-layer KV cache) for ``step``/``generate``/chunked prefill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import dispatch
from models.config import ModelConfig
from models.generation import Generation
from models.hub import HubMixin
from models.mamba import Backbone, LMOutput, RMSNorm


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
class KVCache:
    """Keys and values (b, n_head, T, head_dim) of the T positions one attention layer has seen."""

    k: torch.Tensor
    v: torch.Tensor

    def repeat(self, n: int) -> KVCache:
        """Each sequence's cache n times in a row (to score n continuations of one prompt)."""
        return KVCache(self.k.repeat_interleave(n, 0), self.v.repeat_interleave(n, 0))


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.head_dim, self.theta = cfg.n_head, cfg.d_model // cfg.n_head, cfg.rope_theta
        self.qkv_proj = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x (b, L, d_model). With ``cache``, x continues the cached positions, and its keys and values are
        appended to the cache."""
        b, L, d = x.shape
        past = 0 if cache is None else cache.k.shape[2]
        q, k, v = self.qkv_proj(x).view(b, L, 3, self.n_head, self.head_dim).unbind(2)
        cos, sin = rope_tables(L, self.head_dim, self.theta, x.device, start=past)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        flash = _flash_attn() if x.is_cuda and q.dtype in (torch.float16, torch.bfloat16) else None
        if flash is not None and cache is None:
            return self.o_proj(flash(q, k, v, causal=True).reshape(b, L, d))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (b, h, L, head_dim)
        mask = None
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

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Attention then MLP, pre-norm, in MambaBlock's (hidden, residual) form: the new residual stream is
    hidden + residual; returns (mlp output, stream after attention), whose sum is the block's output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        normed, stream = self.norm(hidden, residual)
        normed, stream = self.mlp_norm(self.mixer(normed.to(hidden.dtype), cache), stream)
        return self.mlp(normed.to(hidden.dtype)), stream


class TransformerLM(Generation, HubMixin, nn.Module):
    """Llama-style causal LM with a head tied to the embedding; MambaLM's interface, a KV cache as the state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg, TransformerBlock)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.lm_head.weight = self.backbone.embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.02) everywhere, residual output projections scaled by 1/sqrt(2·n_layer) (GPT-2: two
        residual additions per layer)."""
        std = self.config.initializer_range
        nn.init.normal_(self.backbone.embeddings.weight, std=std)
        for layer in self.backbone.layers:
            for lin in (layer.mixer.qkv_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
                nn.init.normal_(lin.weight, std=std)
            for lin in (layer.mixer.o_proj, layer.mlp.down_proj):
                nn.init.normal_(lin.weight, std=std / math.sqrt(2 * self.config.n_layer))

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (the tied head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.backbone.embeddings.weight.numel() if exclude_embeddings else n

    def borrowed_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """The LM computes the loss from the tied head weight it does not own (see MambaLM)."""
        return [(self, self.lm_head.weight)]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                states: list[KVCache] | None = None, return_logits: bool = True) -> LMOutput:
        """As MambaLM.forward: ``labels`` already shifted, -100 ignored, fp32 chunked cross-entropy; with
        ``states`` (KV caches) the input continues the cached positions."""
        hidden = self.backbone(input_ids, states)
        loss = None
        if labels is not None:
            loss = dispatch.linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                                 ignore_index=-100)
        return LMOutput(logits=self.lm_head(hidden) if return_logits else None, loss=loss)
