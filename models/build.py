"""The one model factory: ``build_model(cfg)`` builds the LM of the architecture ``cfg.arch`` registered."""

from __future__ import annotations

import torch.nn as nn

from models.config import ModelConfig
from models.registry import get_arch


def build_model(cfg: ModelConfig) -> nn.Module:
    """The LM of ``cfg.arch`` (models.registry): a MambaLM, Mamba2LM, TransformerLM or a plugin's."""
    return get_arch(cfg.arch).model(cfg)
