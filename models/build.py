"""The one model factory: ``build_model(cfg)`` picks the architecture named by ``ModelConfig.arch``."""

from __future__ import annotations

import torch.nn as nn

from models.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """A MambaLM (``arch: mamba``, baseline or polarized), a Mamba2LM (``arch: mamba2``) or a TransformerLM
    (``arch: transformer``)."""
    if cfg.arch == "transformer":
        from models.transformer import TransformerLM

        return TransformerLM(cfg)
    if cfg.arch == "mamba2":
        from models.mamba2 import Mamba2LM

        return Mamba2LM(cfg)
    from models.mamba import MambaLM

    return MambaLM(cfg)
