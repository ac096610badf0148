"""Mamba-2 interchange: a stock transformers Mamba2ForCausalLM (odd small config, random weights; and the default,
untied config) round-trips both ways with equal logits and greedy generations; a polarized export is lossless for us
and refused by stock transformers with the reason in its config."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Mamba2Config, Mamba2ForCausalLM

from models.hf import from_pretrained, save_pretrained
from models.hf_mamba2 import POLAR_MODEL_TYPE
from models.mamba2 import Mamba2LM
from models.typed_config import ConfigError
from tests.hf_helpers import assert_same_greedy
from tests.test_mamba2 import POLAR, perturbed

VOCAB = 211


def stock_model() -> Mamba2ForCausalLM:
    """Odd shapes: vocab 211, 6 heads of 12, 3 groups, N 5, conv 3, chunk 7; weights random, off their init."""
    cfg = Mamba2Config(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2, expand=3, num_heads=6, head_dim=12,
                       n_groups=3, state_size=5, conv_kernel=3, chunk_size=7, tie_word_embeddings=True,
                       pad_token_id=0, bos_token_id=0, eos_token_id=1)
    model = Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def test_stock_checkpoint_loads_with_equal_logits_and_generation(tmp_path):
    theirs = stock_model()
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path).eval()
    assert isinstance(ours, Mamba2LM) and ours.config.padded_vocab_size == VOCAB
    ids = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
    prompt = ids[:1, :5]
    assert_same_greedy(ours, theirs, prompt, 12)


def test_our_export_loads_in_stock_transformers(tmp_path):
    theirs = stock_model()
    theirs.save_pretrained(tmp_path / "stock")
    ours = from_pretrained(tmp_path / "stock").eval()
    save_pretrained(ours, tmp_path / "ours")
    back = Mamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
    prompt = ids[:1, :4]
    assert_same_greedy(ours, back, prompt, 8)


@pytest.mark.parametrize("variant", [{}, POLAR])
def test_save_then_load_is_lossless(variant, tmp_path):
    ours = perturbed(**variant)
    save_pretrained(ours, tmp_path)
    back = from_pretrained(tmp_path).eval()
    assert back.config == ours.config
    for name, t in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_polarized_export_says_why_stock_transformers_cannot_load_it(tmp_path):
    save_pretrained(perturbed(**POLAR), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == POLAR_MODEL_TYPE and "cannot load" in config["polar_mamba_note"]
    with pytest.raises(Exception, match="polar_mamba2"):  # the Auto classes do not know the model type
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(Exception, match="ignore_mismatched_sizes"):  # forced: A_log per channel does not fit
        Mamba2ForCausalLM.from_pretrained(tmp_path)


def test_stock_default_config_untied_head_round_trips(tmp_path):
    """transformers' Mamba2Config is untied by default: such a stock checkpoint (small, random weights) loads with its
    own head and equal logits, and our export of it loads back in stock transformers with equal logits. Catches an
    untied stock head refused, or silently replaced by the embedding."""
    theirs = Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=8,
                                            head_dim=8)).eval()  # every other field transformers' default
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    assert not theirs.config.tie_word_embeddings
    theirs.save_pretrained(tmp_path / "stock")
    ours = from_pretrained(tmp_path / "stock").eval()
    assert not ours.config.tie_embeddings and ours.lm_head.weight is not ours.backbone.embeddings.weight
    ids = torch.randint(0, VOCAB, (2, 19))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)
    save_pretrained(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] is False
    back = Mamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_loads_mamba_ssm_mamba2_layout(tmp_path):
    """mamba_ssm's folder (config.json with ssm_cfg.layer Mamba2, pytorch_model.bin, backbone.embedding)."""
    ours = perturbed()
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ours.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    cfg = ours.config
    ssm_cfg = {"layer": "Mamba2", "d_state": cfg.ssm.d_state, "headdim": cfg.ssm.head_dim,
               "ngroups": cfg.ssm.n_groups, "chunk_size": cfg.ssm.chunk_size}
    config = {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size, "ssm_cfg": ssm_cfg,
              "rms_norm": True, "residual_in_fp32": True, "pad_vocab_size_multiple": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    back = from_pretrained(tmp_path, trust_pickle=True).eval()
    ids = torch.randint(0, VOCAB, (2, 11)) % cfg.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits)
    config["ssm_cfg"]["d_ssm"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="d_ssm"):
        from_pretrained(tmp_path, trust_pickle=True)
