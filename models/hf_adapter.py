"""The interface an architecture implements to move between our models and Hugging Face folders.

:mod:`models.hf` owns the folder format (config.json with our config under ``polar_mamba``, safetensors
shards, the head tied or not) and calls an architecture's adapter only for what differs per architecture:
the stock config fields, tensor names/layouts, reading stock configs, and which transformers class loads
an export. Missing methods fail when the adapter is instantiated (an abstract base), i.e. at registration.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


class HFAdapter(ABC):
    """One architecture's side of the interchange; every state dict here is without the LM head, which
    :mod:`models.hf` writes only when untied (``lm_head.weight``, transformers' name)."""

    @abstractmethod
    def config_json(self, cfg: Any) -> dict[str, Any]:
        """config.json fields of the stock class (``architectures``, ``model_type``, sizes); :mod:`models.hf`
        adds ``tie_word_embeddings``, the token ids and our whole config."""

    @abstractmethod
    def export_state_dict(self, cfg: Any, sd: StateDict) -> StateDict:
        """Our tensors in the folder's names and layouts."""

    @abstractmethod
    def import_state_dict(self, cfg: Any, sd: StateDict) -> StateDict:
        """Inverse of :meth:`export_state_dict`, also for the stock folders :meth:`reads` accepts."""

    @abstractmethod
    def reads(self, data: dict[str, Any]) -> bool:
        """Whether this adapter reads a config.json that is not ours (a stock transformers or mamba_ssm one)."""

    @abstractmethod
    def config_from_json(self, data: dict[str, Any]) -> Any:
        """Our ModelConfig from a config.json :meth:`reads` accepts."""

    @abstractmethod
    def stock_class(self, cfg: Any) -> str | None:
        """The transformers class that loads an export of ``cfg``; None when only polar-mamba does."""


class PolarOnlyAdapter(HFAdapter):
    """For an architecture no stock class has: the folder keeps our tensors as they are and loads with polar."""

    def __init__(self, arch: str):
        self.arch = arch

    def config_json(self, cfg: Any) -> dict[str, Any]:
        return {"architectures": [type(cfg).__name__.removesuffix("Config") + "LM"], "model_type": f"polar_{self.arch}"}

    def export_state_dict(self, cfg: Any, sd: StateDict) -> StateDict:
        return sd

    def import_state_dict(self, cfg: Any, sd: StateDict) -> StateDict:
        return sd

    def reads(self, data: dict[str, Any]) -> bool:
        return False

    def config_from_json(self, data: dict[str, Any]) -> Any:
        raise NotImplementedError("a polar-only folder always carries our config")

    def stock_class(self, cfg: Any) -> str | None:
        return None
