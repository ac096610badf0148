"""Mamba2LM: stock transformers' Mamba2ForCausalLM computes our logits from our state dict; recurrent decoding
and chunked prefill = the parallel forward (baseline and polarized); polar channels; init; presets; config errors."""

import pytest
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

from models import ModelConfig, build_model
from models.mamba2 import Mamba2LM
from models.typed_config import ConfigError

ODD = {"vocab_size": 203, "pad_vocab_size_multiple": 1, "ssm.d_state": 6, "ssm.head_dim": 8, "ssm.n_groups": 2,
       "ssm.chunk_size": 5}
POLAR = {"polarize.ones": 1, "polarize.zeros": 2}


def perturbed(**overrides) -> Mamba2LM:
    """A tiny Mamba-2 (16 heads of 8, 2 groups, odd vocab and chunk) with its SSM and norm parameters moved off init."""
    model = build_model(ModelConfig.preset("mamba2-tiny", **{**ODD, **overrides})).eval()
    with torch.no_grad():
        for layer in model.backbone.layers:
            m = layer.mixer
            for p in (m.A_log, m.D, m.dt_bias, m.norm.weight, layer.norm.weight, m.conv1d.bias):
                p.add_(torch.randn_like(p) * 0.3)
    return model


def stock_twin(model: Mamba2LM) -> Mamba2ForCausalLM:
    """transformers' Mamba2ForCausalLM at the same shapes, holding our state dict as is."""
    cfg = model.config
    hf = Mamba2ForCausalLM(Mamba2Config(
        vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer, expand=cfg.ssm.expand,
        num_heads=cfg.n_heads, head_dim=cfg.ssm.head_dim, n_groups=cfg.ssm.n_groups, state_size=cfg.d_state_total,
        conv_kernel=cfg.ssm.d_conv, chunk_size=cfg.ssm.chunk_size, layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=True)).eval()
    hf.load_state_dict(model.state_dict())
    return hf


def test_stock_mamba2_computes_our_logits():
    ours = perturbed()
    ids = torch.randint(0, 203, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, stock_twin(ours)(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", [{}, POLAR])
def test_steps_and_chunked_prefill_reproduce_parallel_forward(variant):
    model = perturbed(**variant)
    ids = torch.randint(0, 203, (2, 19))
    with torch.no_grad():
        full = model(ids).logits
        states = model.new_states(2)
        parts = [model(ids[:, :7], states=states).logits, model(ids[:, 7:15], states=states).logits]
        parts += [model.step(ids[:, t], states)[:, None] for t in range(15, 19)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)


def test_polar_channels_with_zero_b_columns_are_the_baseline():
    """A polarized model whose polar B columns are zero (in_proj rows and conv) computes the baseline exactly."""
    polar = perturbed(**POLAR)
    base = build_model(ModelConfig.preset("mamba2-tiny", **ODD)).eval()
    g, n, N = 2, 1 + 6 + 2, 6
    di = polar.config.d_inner
    learned = torch.zeros(g, n, dtype=torch.bool)
    learned[:, 1 : 1 + N] = True
    keep_xbc = torch.cat([torch.ones(di, dtype=torch.bool), learned.flatten(), learned.flatten()])
    n_heads = polar.config.n_heads
    keep_in = torch.cat([torch.ones(di, dtype=torch.bool), keep_xbc, torch.ones(n_heads, dtype=torch.bool)])
    sd = {}
    for name, t in polar.state_dict().items():
        if name.endswith("mixer.in_proj.weight"):
            t = t[keep_in]
        elif ".mixer.conv1d." in name:
            t = t[keep_xbc]
        sd[name] = t
    base.load_state_dict(sd)
    with torch.no_grad():
        for layer in polar.backbone.layers:  # zero the polar B columns: x_t B_t = 0 for those channels
            w = layer.mixer.in_proj.weight
            b_rows = di + di + torch.arange(g * n).view(g, n)[~learned]
            w[b_rows] = 0
            layer.mixer.conv1d.bias[b_rows - di] = 0
        ids = torch.randint(0, 203, (2, 11))
        torch.testing.assert_close(polar(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-6)
        layer.mixer.conv1d.bias[b_rows[0] - di] = 1.0  # and a live ones channel changes the output
        assert not torch.allclose(polar(ids).logits, base(ids).logits, atol=1e-3)


def test_initialisation_follows_mamba_ssm():
    model = build_model(ModelConfig.preset("mamba2-tiny", n_layer=4))
    m = model.backbone.layers[0].mixer
    A = torch.exp(m.A_log)
    assert torch.all((A >= 1) & (A <= 16)) and torch.all(m.D == 1)
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert torch.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
    assert model.lm_head.weight is model.backbone.embeddings.weight


def test_loss_and_grads_finite_polarized():
    model = build_model(ModelConfig.preset("mamba2-tiny-polar")).train()
    ids = torch.randint(0, 512, (2, 70))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_presets_have_the_paper_sizes():
    """Counted parameters of the Mamba-2 paper's shapes (GPT-NeoX vocab): ~130M / 370M / 780M."""
    counts = {}
    for name in ("mamba2-130m", "mamba2-370m", "mamba2-780m"):
        with torch.device("meta"):
            counts[name] = build_model(ModelConfig.preset(name)).num_parameters()
    assert [round(c / 1e7) for c in counts.values()] == [13, 37, 78]
    with torch.device("meta"):  # each polar channel adds 2·n_groups rows to in_proj and channels to conv1d
        extra = build_model(ModelConfig.preset("mamba2-130m-polar")).num_parameters() - counts["mamba2-130m"]
    assert extra == 24 * 2 * 2 * (768 + 4 + 1)


@pytest.mark.parametrize("overrides,match", [
    ({"ssm.head_dim": 24}, "head_dim must divide"),
    ({"ssm.n_groups": 3}, "n_groups must divide"),
    ({"polarize.zeros": 1, "polarize.zero_mode": "reference"}, "zero_mode: exact"),
])
def test_bad_config_raises_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.preset("mamba2-tiny", **overrides)


def test_counted_flops_projections_match_torch_flop_counter():
    """in_proj, out_proj and the LM head of `polar plan`'s count equal the matmuls torch's FLOP counter sees;
    the rest is the conv, the SSD's chunk matmuls and elementwise work, counted from the shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.metrics import forward_flops_per_token

    cfg = ModelConfig.preset("mamba2-tiny-polar", n_layer=3, vocab_size=1000)
    B, L = 2, 16
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        build_model(cfg)(torch.randint(0, 1000, (B, L)))
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmuls = sum(n for op, n in by_op.items() if op.split(".")[1] in ("mm", "addmm"))
    Ed, Nt, T, bc = cfg.d_inner, cfg.d_state_total, cfg.ssm.chunk_size, cfg.d_state_total * cfg.ssm.n_groups
    rest = 2 * (Ed + 2 * bc) * cfg.ssm.d_conv + 2 * T * (bc + Ed) + 4 * Ed * Nt + 8 * Ed
    assert forward_flops_per_token(cfg) == matmuls / (B * L) + cfg.n_layer * rest
