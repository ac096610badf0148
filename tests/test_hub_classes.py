"""HF-style model classes: ``MambaLM`` / ``TransformerLM`` ``.from_pretrained`` / ``.save_pretrained`` /
``.push_to_hub`` round-trip, write the folder stock transformers loads (Mamba), read folders stock
transformers wrote, and `polar export` writes generation_config.json as publish does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from models import MambaLM, ModelConfig, TransformerLM
from models.typed_config import ConfigError


def perturbed(cls, preset: str, **overrides):
    """A tiny model with every parameter moved off its init (fresh random each call)."""
    model = cls(ModelConfig.preset(preset, vocab_size=509, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("overrides", [{}, {"polarize.ones": 1, "polarize.zeros": 1}], ids=["baseline", "polar"])
def test_mamba_round_trip_agrees_with_stock_transformers(tmp_path, overrides):
    ours = perturbed(MambaLM, "mamba-tiny", **overrides)
    ours.save_pretrained(tmp_path)
    ids = torch.randint(0, 509, (2, 23))
    back = MambaLM.from_pretrained(tmp_path)
    assert isinstance(back, MambaLM) and back.config == ours.config
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), rtol=0, atol=0)
    stock = MambaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(stock, ids), logits(ours, ids), rtol=1e-4, atol=1e-5)


def test_mamba_loads_a_folder_stock_transformers_saved(tmp_path):
    torch.manual_seed(torch.seed() % 2**31)
    stock = MambaForCausalLM(MambaConfig(vocab_size=512, hidden_size=32, state_size=8, num_hidden_layers=2,
                                         expand=2, conv_kernel=4, tie_word_embeddings=True)).eval()
    stock.save_pretrained(tmp_path)
    ours = MambaLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 512, (1, 17))
    torch.testing.assert_close(logits(ours, ids), logits(stock, ids), rtol=1e-4, atol=1e-5)


def test_transformer_round_trip_and_class_check(tmp_path):
    ours = perturbed(TransformerLM, "transformer-tiny")
    ours.save_pretrained(tmp_path)
    back = TransformerLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 509, (2, 19))
    torch.testing.assert_close(logits(back, ids), logits(ours, ids), rtol=0, atol=0)
    assert back.lm_head.weight is back.backbone.embeddings.weight  # still tied
    with pytest.raises(ConfigError, match="TransformerLM, not a MambaLM"):
        MambaLM.from_pretrained(tmp_path)


def test_push_to_hub_uploads_the_saved_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    uploaded = {}

    def upload_folder(self, *, repo_id, folder_path, **kw):
        uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir()})
        uploaded["repo_id"] = repo_id
        return "https://hub/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: type("R", (), {"repo_id": repo_id})())
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = perturbed(MambaLM, "mamba-tiny", **{"polarize.ones": 1})
    model.push_to_hub("org/tiny")
    assert uploaded["repo_id"] == "org/tiny"
    folder = tmp_path / "pushed"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes(uploaded[name])
    assert json.loads(uploaded["config.json"])["polar_mamba"]["polarize"]["ones"] == 1
    ids = torch.randint(0, 509, (1, 13))
    torch.testing.assert_close(logits(MambaLM.from_pretrained(folder), ids), logits(model, ids), rtol=0, atol=0)


def test_saved_card_states_the_code_and_links_only_a_given_url(tmp_path):
    """Catches huggingface_hub's placeholder card ("Code: [More Information Needed]"), a code link nobody
    configured, and a card or `pip show` without the code's license and version (LICENSE, pyproject.toml)."""
    from pretrain.about import CODE_LICENSE, code_version

    root = Path(__file__).resolve().parents[1]
    assert f'license = "{CODE_LICENSE}"' in (root / "pyproject.toml").read_text()
    assert "Apache License" in (root / "LICENSE").read_text() and CODE_LICENSE == "Apache-2.0"
    model = MambaLM(ModelConfig.preset("mamba-tiny", vocab_size=509))
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "linked", model_card_kwargs={"code_url": "https://example.org/polar"})
    plain, linked = ((tmp_path / d / "README.md").read_text() for d in ("plain", "linked"))
    for card in (plain, linked):
        assert "More Information Needed" not in card
        assert f"polar-mamba {code_version()} (code license {CODE_LICENSE})" in card
    assert "Code:" not in plain and "http" not in plain.replace("https://arxiv.org/abs/2501.00658", "")
    assert "- Code: https://example.org/polar" in linked
