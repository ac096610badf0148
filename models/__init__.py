"""Language models (Mamba baseline and polarized, Mamba-2, the Transformer baseline, and plugins' architectures):
their configs, the registry that names them, and the factory. Importing the package registers the built-in
architectures (models.archs); plugins' ones load on first lookup or when `polar` starts (models.plugins)."""

from models import archs  # noqa: F401  (registers mamba, mamba2, transformer)
from models.build import build_model
from models.config import ModelConfig
from models.mamba import MambaLM
from models.registry import PRESETS, ArchSpec, get_arch, register_arch
from models.ssm import PolarizeConfig, SSMConfig
from models.transformer import TransformerLM

__all__ = ["PRESETS", "ArchSpec", "ModelConfig", "PolarizeConfig", "SSMConfig", "MambaLM", "TransformerLM",
           "build_model", "get_arch", "register_arch"]
