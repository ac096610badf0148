"""Hugging Face-style ``from_pretrained`` / ``save_pretrained`` / ``push_to_hub`` on our model classes:
huggingface_hub's ``ModelHubMixin`` with the folder format of models/hf.py (stock transformers loads a
saved MambaLM as ``MambaForCausalLM``), so there is one implementation of that format.

The README.md the mixin writes states the code's name, version and license and the paper; it links the code only
when the caller gives a URL (``model.save_pretrained(dir, model_card_kwargs={"code_url": URL})``), never a
placeholder such as huggingface_hub's default "Code: [More Information Needed]"."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelHubMixin

from models.hf import from_pretrained, save_pretrained
from models.typed_config import ConfigError

PAPER_URL = "https://arxiv.org/abs/2501.00658"
CARD_TEMPLATE = """---
{{ card_data }}
---

A polar-mamba model, saved with {{ code }}.
- Paper: {{ paper_url }}
{% if code_url %}- Code: {{ code_url }}
{% endif %}"""


class HubMixin(ModelHubMixin, library_name="transformers", paper_url=PAPER_URL, pipeline_tag="text-generation",
               tags=["polar-mamba"], model_card_template=CARD_TEMPLATE):
    """``Model.from_pretrained(folder or ORG/NAME, revision=..., device=...)``, ``model.save_pretrained(folder)``
    and ``model.push_to_hub(ORG/NAME)`` through models.hf.save_pretrained / from_pretrained."""

    def generate_model_card(self, *args, code_url: str | None = None, **kwargs):
        from pretrain.about import code_line

        return super().generate_model_card(*args, code=code_line(), code_url=code_url, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        save_pretrained(self, save_directory)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir, force_download: bool,
                         local_files_only: bool, token, device: str = "cpu", trust_pickle: bool = False,
                         **_unused):
        model = from_pretrained(model_id, revision=revision, device=device, trust_pickle=trust_pickle)
        if not isinstance(model, cls):
            raise ConfigError(f"{model_id} holds a {type(model).__name__}, not a {cls.__name__}: load it with "
                              f"{type(model).__name__}.from_pretrained or models.hf.from_pretrained")
        return model
