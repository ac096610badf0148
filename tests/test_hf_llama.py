"""Transformer interchange with transformers' LlamaForCausalLM: stock checkpoints (untied, the Llama default, and
tied; random weights) load with equal logits, our exports load in stock transformers with equal logits, and Llama
options we do not have are refused in one line."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models import ModelConfig, TransformerLM, build_model
from models.hf import from_pretrained, save_pretrained
from models.typed_config import ConfigError

VOCAB = 211


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[..., :VOCAB]


def stock_llama(**overrides) -> LlamaForCausalLM:
    cfg = LlamaConfig(**{"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 88, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 4, **overrides})
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def random_theta() -> float:
    return float(torch.randint(1000, 500000, ()))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_stock_llama_round_trips_both_ways(tmp_path, tied):
    """stock -> ours -> saved folder -> stock, logits equal each way. Catches a wrong q/k/v split or RoPE layout, or
    an untied Llama refused or given the embedding as its head."""
    theirs = stock_llama(tie_word_embeddings=tied, rope_theta=random_theta())
    theirs.save_pretrained(tmp_path / "stock")
    ours = from_pretrained(tmp_path / "stock").eval()
    assert isinstance(ours, TransformerLM) and ours.config.tie_embeddings == tied
    ids = torch.randint(0, VOCAB, (2, 23))
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-4, atol=1e-4)
    save_pretrained(ours, tmp_path / "ours")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(logits(back, ids), logits(theirs, ids), rtol=1e-4, atol=1e-4)
    assert from_pretrained(tmp_path / "ours").config == ours.config  # our config rides along


def test_our_transformer_exports_as_llama(tmp_path):
    ours = build_model(ModelConfig.preset("transformer-tiny", vocab_size=VOCAB, d_ff=72)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_pretrained(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    stock = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, VOCAB, (3, 17))
    torch.testing.assert_close(logits(stock, ids), logits(ours, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("overrides,match", [
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "RoPE scaling"),
])
def test_llama_options_we_lack_are_refused(tmp_path, overrides, match):
    stock_llama(**overrides).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=match):
        from_pretrained(tmp_path)
