"""Mamba language models (baseline and polarized) and their configs."""

from models.config import PRESETS, ModelConfig, PolarizeConfig, SSMConfig
from models.mamba import MambaLM

__all__ = ["PRESETS", "ModelConfig", "PolarizeConfig", "SSMConfig", "MambaLM"]
