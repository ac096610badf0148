"""Interchange: stock transformers MambaForCausalLM reproduces our logits; folders round-trip; mamba_ssm layout."""

import json

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from models import MambaLM, ModelConfig
from models.hf import UntrustedPickleError, from_pretrained, save_pretrained, to_hf_state_dict
from models.typed_config import ConfigError
from tests.hf_helpers import assert_same_greedy

VARIANTS = {
    "baseline": {},
    "polar-exact": {"polarize.ones": 1, "polarize.zeros": 1},
    "polar-reference": {"polarize.ones": 1, "polarize.zeros": 2, "polarize.zero_mode": "reference"},
}


def perturbed_model(**overrides) -> MambaLM:
    """A tiny model with SSM parameters moved away from their structured init (fresh each call)."""
    model = MambaLM(ModelConfig.preset("mamba-tiny", vocab_size=509, **overrides)).eval()
    with torch.no_grad():
        for layer in model.backbone.layers:
            m = layer.mixer
            m.A_log.add_(torch.randn_like(m.A_log) * 0.5)
            m.D.add_(torch.randn_like(m.D))
            m.dt_proj.bias.add_(torch.randn_like(m.dt_proj.bias))
            layer.norm.weight.add_(torch.randn_like(layer.norm.weight) * 0.2)
    return model


@pytest.mark.parametrize("variant", VARIANTS)
def test_stock_transformers_gives_our_logits(variant, tmp_path):
    ours = perturbed_model(**VARIANTS[variant])
    save_pretrained(ours, tmp_path)
    theirs = MambaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 509, (2, 37))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["baseline", "polar-exact"])
def test_stock_transformers_greedy_generate_matches(variant, tmp_path):
    ours = perturbed_model(**VARIANTS[variant])
    save_pretrained(ours, tmp_path)
    theirs = MambaForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 509, (1, 6))
    assert theirs.generation_config.eos_token_id == 0  # the exported id: a greedy path may well meet it
    assert_same_greedy(ours, theirs, prompt, 10)


def test_export_expands_a_log_to_exact_polar_channels(tmp_path):
    ours = perturbed_model(**VARIANTS["polar-exact"])
    a_log = to_hf_state_dict(ours)["backbone.layers.0.mixer.A_log"]
    assert a_log.shape == (ours.config.d_inner, 18)
    assert torch.all(a_log[:, 0] == -torch.inf) and torch.all(a_log[:, -1] == torch.inf)
    A = -torch.exp(a_log)
    dt = torch.rand(5)[:, None, None] * 0.1
    discrete = torch.exp(A * dt)
    assert torch.all(discrete[..., 0] == 1) and torch.all(discrete[..., -1] == 0)
    save_pretrained(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["state_size"] == 18 and cfg["polar_mamba"]["polarize"] == {"ones": 1, "zeros": 1, "zero_mode": "exact"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_then_load_is_lossless(variant, tmp_path):
    ours = perturbed_model(**VARIANTS[variant])
    save_pretrained(ours, tmp_path)
    back = from_pretrained(tmp_path)
    assert back.config == ours.config
    for (k, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert back.lm_head.weight is back.backbone.embeddings.weight


def test_loads_stock_transformers_checkpoint(tmp_path):
    hf_cfg = MambaConfig(vocab_size=256, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2)
    theirs = MambaForCausalLM(hf_cfg).eval()
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)


def test_untied_stock_checkpoint_keeps_its_head_both_ways(tmp_path):
    """A stock MambaForCausalLM saved with tie_word_embeddings=False (its own lm_head, random weights) loads with that
    head and transformers' logits, and our export of it loads back in stock transformers with the same logits.
    Catches the untied head silently replaced by the embedding (logits off, no warning)."""
    stock = MambaForCausalLM(MambaConfig(vocab_size=512, hidden_size=32, state_size=8, num_hidden_layers=2,
                                         tie_word_embeddings=False)).eval()
    assert not torch.equal(stock.lm_head.weight, stock.backbone.embeddings.weight)
    stock.save_pretrained(tmp_path / "stock")
    ours = from_pretrained(tmp_path / "stock").eval()
    assert not ours.config.tie_embeddings
    ids = torch.randint(0, 512, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock(ids).logits, rtol=1e-4, atol=1e-4)
    save_pretrained(ours, tmp_path / "ours")
    back = MambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, stock(ids).logits, rtol=1e-4, atol=1e-4)


def test_loads_mamba_ssm_layout(tmp_path):
    ours = perturbed_model()
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in ours.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    cfg = ours.config
    (tmp_path / "config.json").write_text(json.dumps({
        "d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
        "ssm_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "pad_vocab_size_multiple": 8,
    }))
    with pytest.raises(UntrustedPickleError) as refused:  # a pickle can run code: loaded only when trusted
        from_pretrained(tmp_path)
    assert len(str(refused.value).splitlines()) == 1 and "--trust-pickle" in str(refused.value)
    back = from_pretrained(tmp_path, trust_pickle=True)
    ids = torch.randint(0, 509, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids).logits)


def test_stock_checkpoint_with_an_odd_vocabulary_round_trips(tmp_path):
    """transformers' embedding has exactly vocab_size rows: no padding to a multiple of 8 on load."""
    vocab = int(torch.randint(300, 700, ()).item()) | 1
    cfg = MambaConfig(vocab_size=vocab, hidden_size=48, state_size=8, num_hidden_layers=2, expand=2,
                      conv_kernel=4, time_step_rank=5)
    stock = MambaForCausalLM(cfg).eval()
    stock.save_pretrained(tmp_path / "stock")
    ours = from_pretrained(tmp_path / "stock").eval()
    save_pretrained(ours, tmp_path / "ours")
    back = MambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, vocab, (2, 19))
    with torch.no_grad():
        expected = stock(ids).logits
        assert expected.shape[-1] == vocab
        torch.testing.assert_close(ours(ids).logits, expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(back(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_missing_folder_and_mismatched_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope not found"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="not found: no such local folder, and the Hub"):
        from_pretrained("no-such-org/no-such-model")  # offline in the tests: the Hub cannot answer
    save_pretrained(perturbed_model(), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["polar_mamba"]["polarize"]["ones"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="state channels"):
        from_pretrained(tmp_path)


def test_no_code_trusts_remote_code_or_unpickles_outside_weights_freely():
    """Catches trust_remote_code set on the user's behalf, or a torch.load of weights from outside without
    weights_only=True (our own DeepSpeed checkpoints, pretrain/checkpoint.py, may keep their pickles)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for f in (p for d in ("models", "pretrain", "eval", "tokenizer", "kernels") for p in (root / d).rglob("*.py")):
        text = f.read_text()
        assert not re.search(r"trust_remote_code\s*[=:]\s*True|[\"']trust_remote_code[\"']\s*:\s*True", text), f
        if f.name != "checkpoint.py":
            assert all("weights_only=True" in call for call in re.findall(r"torch\.load\([^)]*\)", text)), f
