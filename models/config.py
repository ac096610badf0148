"""ModelConfig: the typed description of a Mamba LM (baseline or polarized; Mamba-1, or Mamba-2 with
``arch: mamba2``) or of the Llama-style Transformer baseline (``arch: transformer``), and their named presets.

Polarization (Wang et al. 2025, §4): ``polarize.ones`` state channels whose transition is fixed at
A_t = 1 (never forget) and ``polarize.zeros`` channels fixed at A_t = 0 (no memory) are added beside
the ``ssm.d_state`` learned channels; B and C from x_proj cover all of them. ``zero_mode: reference``
reproduces the paper's code, which realises the zero channel as A = -100.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from models.typed_config import ConfigError, apply_overrides, bounded, check_bounds, from_dict, to_dict


@dataclass
class PolarizeConfig:
    ones: int = bounded(0, ge=0)
    zeros: int = bounded(0, ge=0)
    zero_mode: Literal["exact", "reference"] = "exact"

    def __post_init__(self):
        if self.zero_mode not in ("exact", "reference"):
            raise ConfigError(f"polarize.zero_mode must be 'exact' or 'reference', got {self.zero_mode!r}")

    @property
    def enabled(self) -> bool:
        return self.ones > 0 or self.zeros > 0


@dataclass
class SSMConfig:
    d_state: int = bounded(16, gt=0)  # N learned channels
    d_conv: int = bounded(4, gt=0)
    expand: int = bounded(2, gt=0)
    dt_rank: int | Literal["auto"] = bounded("auto", gt=0)  # auto: ceil(d_model / 16)
    dt_min: float = bounded(1e-3, gt=0)
    dt_max: float = bounded(1e-1, gt=0)
    dt_init_floor: float = bounded(1e-4, gt=0)
    conv_bias: bool = True
    proj_bias: bool = False
    # Mamba-2 only (arch: mamba2, models/mamba2.py): d_inner = n_heads x head_dim; B and C are shared by
    # n_groups groups of heads; chunk_size is the SSD algorithm's block length.
    head_dim: int = bounded(64, gt=0)
    n_groups: int = bounded(1, gt=0)
    chunk_size: int = bounded(256, gt=0)

    def __post_init__(self):
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"ssm.dt_min/dt_max must satisfy 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")


@dataclass
class ModelConfig:
    arch: Literal["mamba", "mamba2", "transformer"] = "mamba"
    d_model: int = bounded(768, gt=0)
    n_layer: int = bounded(24, gt=0)
    vocab_size: int = bounded(50277, gt=0)
    pad_vocab_size_multiple: int = bounded(8, gt=0)
    norm_eps: float = bounded(1e-5, gt=0)
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    initializer_range: float = bounded(0.02, gt=0)
    rescale_prenorm_residual: bool = True
    # mamba_ssm: its init (Δ from [dt_min, dt_max]). zoology: the polarization paper's MQAR code
    # (every Linear N(0, initializer_range), every bias 0 incl. dt_proj's so Δ starts at softplus(0),
    # out_proj N(0, initializer_range / sqrt(2 n_layer))); models.mamba.MambaLM.reset_parameters.
    init: Literal["mamba_ssm", "zoology"] = "mamba_ssm"
    final_norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # layernorm: the paper's MQAR model (not HF-exportable)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    polarize: PolarizeConfig = field(default_factory=PolarizeConfig)
    # Transformer only (arch: transformer); ssm and polarize are Mamba only.
    n_head: int = bounded(4, gt=0)
    d_ff: int | None = bounded(None, gt=0)  # SwiGLU hidden size; None: Llama's 8/3 x d_model, rounded up to 8s
    rope_theta: float = bounded(10000.0, gt=0)

    def __post_init__(self):
        check_bounds(ModelConfig, vars(self), "model")  # also when built directly: the checks below divide by these
        if self.d_model % 8:
            raise ConfigError(f"model.d_model must be a multiple of 8 (kernel tiling), got {self.d_model}")
        if self.init not in ("mamba_ssm", "zoology") or self.final_norm not in ("rmsnorm", "layernorm"):
            raise ConfigError(f"model.init must be mamba_ssm|zoology and model.final_norm rmsnorm|layernorm, "
                              f"got {self.init!r}, {self.final_norm!r}")
        if self.init != "mamba_ssm" and self.arch != "mamba":
            raise ConfigError(f"model.init: zoology is the paper's Mamba-1 MQAR init; arch {self.arch} keeps its own "
                              "(the Transformer's is already N(0, 0.02) with 1/sqrt(2 n_layer) output projections)")
        if not self.tie_embeddings:
            raise ConfigError("model.tie_embeddings: only tied embeddings are supported (HF's Mamba layout ties them)")
        if self.arch == "transformer":
            if self.polarize.enabled:
                raise ConfigError("model.polarize applies to arch: mamba only; set polarize.ones/zeros to 0")
            if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
                raise ConfigError(f"model.n_head must divide d_model into an even head size (RoPE rotates pairs), "
                                  f"got d_model={self.d_model}, n_head={self.n_head}")
        if self.arch == "mamba2":
            if self.d_inner % self.ssm.head_dim or self.n_heads % self.ssm.n_groups:
                raise ConfigError(f"mamba2: ssm.head_dim must divide expand x d_model = {self.d_inner} into heads and "
                                  f"ssm.n_groups must divide the heads, got head_dim={self.ssm.head_dim}, "
                                  f"n_groups={self.ssm.n_groups}")
            if self.polarize.zeros and self.polarize.zero_mode == "reference":
                raise ConfigError("polarize.zero_mode: reference (A = -100) is Mamba-1's paper code; "
                                  "use zero_mode: exact with arch: mamba2")

    # Derived sizes -------------------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.ssm.expand * self.d_model

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.ssm.dt_rank == "auto" else self.ssm.dt_rank

    @property
    def n_heads(self) -> int:
        """Mamba-2 heads (each with one scalar decay)."""
        return self.d_inner // self.ssm.head_dim

    @property
    def d_state_total(self) -> int:
        """All state channels: ones + learned + zeros (the order B and C use)."""
        return self.polarize.ones + self.ssm.d_state + self.polarize.zeros

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or (8 * self.d_model // 3 + 7) // 8 * 8

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    # Construction --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], prefix: str = "model") -> ModelConfig:
        return from_dict(cls, data, prefix=prefix)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset; ``overrides`` are dotted keys, e.g. ``preset("mamba-130m", **{"polarize.ones": 1})``
        or plain fields (``n_layer=4``)."""
        if name not in PRESETS:
            from models.typed_config import _suggest

            raise ConfigError(f"unknown model preset '{name}': {_suggest(name, list(PRESETS))}")
        return cls.from_dict(apply_overrides(PRESETS[name], overrides))

    def with_polarization(self, ones: int = 1, zeros: int = 1) -> ModelConfig:
        return replace(self, polarize=replace(self.polarize, ones=ones, zeros=zeros))


_POLAR = {"polarize": {"ones": 1, "zeros": 1}}

# Sizes: mamba-130m/370m/790m are the Mamba paper's (Gu & Dao 2023, GPT-NeoX vocab 50277). The
# polarization paper's Table 4 trains 100-250M, 250-400M and 400-550M models; mamba-550m covers the
# last bucket. `polar info` prints the counted parameters of every preset.
PRESETS: dict[str, dict[str, Any]] = {
    "mamba-tiny": {"d_model": 64, "n_layer": 2, "vocab_size": 512},
    "mamba-130m": {"d_model": 768, "n_layer": 24},
    "mamba-370m": {"d_model": 1024, "n_layer": 48},
    "mamba-550m": {"d_model": 1280, "n_layer": 46},
    "mamba-790m": {"d_model": 1536, "n_layer": 48},
    # Mamba-2 (Dao & Gu 2024): the paper's 130m/370m/780m shapes (N = 128, head_dim 64, one B/C group).
    "mamba2-tiny": {"arch": "mamba2", "d_model": 64, "n_layer": 2, "vocab_size": 512,
                    "ssm": {"d_state": 16, "head_dim": 16, "chunk_size": 64}},
    "mamba2-130m": {"arch": "mamba2", "d_model": 768, "n_layer": 24, "ssm": {"d_state": 128}},
    "mamba2-370m": {"arch": "mamba2", "d_model": 1024, "n_layer": 48, "ssm": {"d_state": 128}},
    "mamba2-780m": {"arch": "mamba2", "d_model": 1536, "n_layer": 48, "ssm": {"d_state": 128}},
}
PRESETS.update({f"{k}-polar": {**v, **_POLAR} for k, v in list(PRESETS.items())})
# Llama-style Transformer baselines (models/transformer.py).
PRESETS.update({
    "transformer-tiny": {"arch": "transformer", "d_model": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512},
    "transformer-130m": {"arch": "transformer", "d_model": 768, "n_layer": 12, "n_head": 12},
})
