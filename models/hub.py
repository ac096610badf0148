"""Hugging Face-style ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` on our model classes:
huggingface_hub's ``ModelHubMixin`` with the folder format of models/hf.py (stock transformers loads a
saved MambaLM as ``MambaForCausalLM``), so there is one implementation of that format."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelHubMixin

from models.hf import from_pretrained, save_pretrained
from models.typed_config import ConfigError

PAPER_URL = "https://arxiv.org/abs/2501.00658"


class HubMixin(ModelHubMixin, library_name="transformers", paper_url=PAPER_URL, pipeline_tag="text-generation",
               tags=["polar-mamba"]):
    """``Model.from_pretrained(folder or ORG/NAME, revision=..., device=...)``, ``model.save_pretrained(folder)``
    and ``model.push_to_hub(ORG/NAME)`` through models.hf.save_pretrained / from_pretrained."""

    def _save_pretrained(self, save_directory: Path) -> None:
        save_pretrained(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, device: str = "cpu", **_unused):
        model = from_pretrained(model_id, revision=revision, device=device)
        if not isinstance(model, cls):
            raise ConfigError(f"{model_id} holds a {type(model).__name__}, not a {cls.__name__}: load it with "
                              f"{type(model).__name__}.from_pretrained or models.hf.from_pretrained")
        return model
