"""Mamba language models (baseline and polarized), the Transformer baseline, their configs and factory."""

from models.build import build_model
from models.config import PRESETS, ModelConfig, PolarizeConfig, SSMConfig
from models.mamba import MambaLM
from models.transformer import TransformerLM

__all__ = ["PRESETS", "ModelConfig", "PolarizeConfig", "SSMConfig", "MambaLM", "TransformerLM", "build_model"]
