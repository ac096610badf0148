"""The built-in architectures' registry entries: Mamba (``mamba``), Mamba-2 (``mamba2``) and the Llama-style
Transformer (``transformer``), each with its presets, FLOP and activation counts and ``polar info`` columns.

Counts are per token, from the layer shapes: forward FLOPs (multiply-add = 2; ``polar plan`` and the
trainer's MFU) and the elements one token's forward pass keeps for the backward pass (``polar plan``'s
activation memory; tests/test_plan_memory.py checks each against what autograd saves).
"""

from __future__ import annotations

from typing import Any

from models import mamba, mamba2
from models.hf_llama import LlamaAdapter
from models.hf_mamba import MambaAdapter
from models.hf_mamba2 import Mamba2Adapter
from models.mamba import MambaConfig, MambaLM
from models.mamba2 import Mamba2Config, Mamba2LM
from models.registry import ArchSpec, register_arch
from models.transformer import TransformerConfig, TransformerLM

_POLAR = {"polarize": {"ones": 1, "zeros": 1}}


def _with_polar_twins(presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {**presets, **{f"{k}-polar": {**v, **_POLAR} for k, v in presets.items()}}


def _head_flops(cfg) -> int:
    return 2 * cfg.d_model * cfg.padded_vocab_size


def _polar_channels(cfg) -> str:
    return f"{cfg.ssm.d_state}+{cfg.polarize.ones}+{cfg.polarize.zeros}"


# Mamba-1 ------------------------------------------------------------------------------------------------


def mamba_flops_per_token(cfg: MambaConfig, seq_len: int | None = None) -> int:
    d, Ed, R, Nt, k = cfg.d_model, cfg.d_inner, cfg.dt_rank, cfg.d_state_total, cfg.ssm.d_conv
    per_layer = (
        2 * d * 2 * Ed  # in_proj
        + 2 * Ed * k  # depthwise causal conv
        + 2 * Ed * (R + 2 * Nt)  # x_proj
        + 2 * R * Ed  # dt_proj
        + 9 * Ed * Nt  # scan: exp(ΔA), Δ·B·u, a·h + ., C·h (mamba_ssm's count for variable B, C)
        + 6 * Ed  # D skip and SiLU gate
        + 2 * Ed * d  # out_proj
    )
    return cfg.n_layer * per_layer + _head_flops(cfg)


def mamba_activations_per_token(cfg: MambaConfig) -> int:
    """Per layer: the block input and norm output (2d), in_proj's x and z (2Ed), the conv output and its SiLU
    (2Ed), x_proj's output (R + 2N), Δ (Ed), the scan output and the gated product (2Ed)."""
    per_layer = 2 * cfg.d_model + 7 * cfg.d_inner + cfg.dt_rank + 2 * cfg.d_state_total
    return cfg.n_layer * per_layer + 2 * cfg.d_model  # + embedding output and final norm


register_arch(ArchSpec(
    name="mamba", title="Mamba", config=MambaConfig, model=MambaLM, hf=MambaAdapter(),
    # Sizes: mamba-130m/370m/790m are the Mamba paper's (Gu & Dao 2023, GPT-NeoX vocab 50277). The
    # polarization paper's Table 4 trains 100-250M, 250-400M and 400-550M models; mamba-550m covers the
    # last bucket. `polar info` prints the counted parameters of every preset.
    presets=_with_polar_twins({
        "mamba-tiny": {"d_model": 64, "n_layer": 2, "vocab_size": 512},
        "mamba-130m": {"d_model": 768, "n_layer": 24},
        "mamba-370m": {"d_model": 1024, "n_layer": 48},
        "mamba-550m": {"d_model": 1280, "n_layer": 46},
        "mamba-790m": {"d_model": 1536, "n_layer": 48},
    }),
    flops_per_token=mamba_flops_per_token,
    activations_per_token=mamba_activations_per_token,
    info_columns=lambda cfg: {"N (+1/+0)": _polar_channels(cfg)},
    add_polar_channels=mamba.add_polar_channels,
))


# Mamba-2 ------------------------------------------------------------------------------------------------


def mamba2_flops_per_token(cfg: Mamba2Config, seq_len: int | None = None) -> int:
    """As the chunked SSD algorithm computes it (Dao & Gu 2024, §6): its within-chunk "attention" costs
    chunk_size-long matmuls per token, the state passing two (d_inner x N) products."""
    d, Ed, Nt, k, T = cfg.d_model, cfg.d_inner, cfg.d_state_total, cfg.ssm.d_conv, cfg.ssm.chunk_size
    bc = cfg.ssm.n_groups * Nt  # B (and C) columns
    per_layer = (
        2 * d * (2 * Ed + 2 * bc + cfg.n_heads)  # in_proj: z, x, B, C, Δ
        + 2 * (Ed + 2 * bc) * k  # depthwise causal conv over x, B, C
        + 2 * T * (bc + Ed)  # within a chunk: C·B scores over T positions, then their weighted sum of Δ·x
        + 2 * 2 * Ed * Nt  # chunk states (B ⊗ Δ·x) and their output C·H
        + 8 * Ed  # D skip, SiLU gate, gated RMSNorm
        + 2 * Ed * d  # out_proj
    )
    return cfg.n_layer * per_layer + _head_flops(cfg)


def mamba2_activations_per_token(cfg: Mamba2Config) -> int:
    """What the backward pass keeps with the PyTorch SSD (kernels/ssd_ref.chunked_core, plain autograd: the path
    without mamba_ssm; its fused kernel keeps less). Per layer, with B/C columns bc = n_groups·N_total (bl over
    the N learned channels the SSD core runs), H heads, T = chunk_size: the block norm's stream, output and
    rstd and in_proj's input (3d + 1); in_proj's output z, x, B, C, Δ (2Ed + 2bc + H); the conv's input and
    output and the SiLU's (3(Ed + 2bc)); Δ before and after softplus (2H); in the chunked SSD, the within-chunk
    decay weights and their product with the C·B scores (2TH), the scores (T·g) and B/C copies (4bl), Δ·x in
    three layouts and the products of the state terms (4Ed), the decays to the chunk ends and of the chunk
    starts (2H), the chunk-start states twice (2·Ed·N/T); the polar channels' Δ·x and cumulative ones states
    (Ed·(1 + ones)); the gated norm's y, SiLU(z), product, normalised output and rstd, and out_proj's input
    (5Ed + g). Copies made for batched matmuls are counted; a sequence of one chunk with one B/C group needs
    a few fewer (the estimate is then ~8% high)."""
    d, Ed, H, T, g = cfg.d_model, cfg.d_inner, cfg.n_heads, cfg.ssm.chunk_size, cfg.ssm.n_groups
    bc, bl = g * cfg.d_state_total, g * cfg.ssm.d_state
    polar = Ed * (1 + cfg.polarize.ones) if cfg.polarize.enabled else 0
    per_layer = (3 * d + 1 + 14 * Ed + 8 * bc + 5 * H + 2 * T * H + T * g + 4 * bl
                 + 2 * Ed * cfg.ssm.d_state // T + polar + g)
    return cfg.n_layer * per_layer + 3 * d  # + the final norm's stream and output, the loss's input


register_arch(ArchSpec(
    name="mamba2", title="Mamba-2", config=Mamba2Config, model=Mamba2LM, hf=Mamba2Adapter(),
    # Mamba-2 (Dao & Gu 2024): the paper's 130m/370m/780m shapes (N = 128, head_dim 64, one B/C group).
    presets=_with_polar_twins({
        "mamba2-tiny": {"d_model": 64, "n_layer": 2, "vocab_size": 512,
                        "ssm": {"d_state": 16, "head_dim": 16, "chunk_size": 64}},
        "mamba2-130m": {"d_model": 768, "n_layer": 24, "ssm": {"d_state": 128}},
        "mamba2-370m": {"d_model": 1024, "n_layer": 48, "ssm": {"d_state": 128}},
        "mamba2-780m": {"d_model": 1536, "n_layer": 48, "ssm": {"d_state": 128}},
    }),
    flops_per_token=mamba2_flops_per_token,
    activations_per_token=mamba2_activations_per_token,
    info_columns=lambda cfg: {"heads x dim": f"{cfg.n_heads}x{cfg.ssm.head_dim}", "N (+1/+0)": _polar_channels(cfg)},
    add_polar_channels=mamba2.add_polar_channels,
))


# Transformer --------------------------------------------------------------------------------------------


def transformer_flops_per_token(cfg: TransformerConfig, seq_len: int | None = None) -> int:
    """Attention scores (2·2·L·d per token and layer) only when given the context length L."""
    d, f = cfg.d_model, cfg.ffn_dim
    per_layer = (
        2 * d * 3 * d  # q, k, v projections
        + 2 * 2 * (seq_len or 0) * d  # scores QK^T and the weighted sum of V over the full context
        + 2 * d * d  # output projection
        + 2 * d * 3 * f  # SwiGLU: gate, up, down
    )
    return cfg.n_layer * per_layer + _head_flops(cfg)


def transformer_activations_per_token(cfg: TransformerConfig) -> int:
    """Per layer: block input and norm (2d), q, k, v (3d), attention output (d), residual and MLP norm (2d), gate,
    up, SiLU(gate) and their product (4f); attention scores are not stored (fused attention)."""
    return cfg.n_layer * (8 * cfg.d_model + 4 * cfg.ffn_dim) + 2 * cfg.d_model


register_arch(ArchSpec(
    name="transformer", title="Transformer (Llama-style)", config=TransformerConfig, model=TransformerLM,
    hf=LlamaAdapter(),
    presets={
        "transformer-tiny": {"d_model": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512},
        "transformer-130m": {"d_model": 768, "n_layer": 12, "n_head": 12},
    },
    flops_per_token=transformer_flops_per_token,
    activations_per_token=transformer_activations_per_token,
    info_columns=lambda cfg: {"heads": str(cfg.n_head), "d_ff": str(cfg.ffn_dim)},
))
