"""MambaLM: recurrent decoding = parallel forward, generation, initialisation, numerics, config errors."""

import math

import pytest
import torch

from kernels import dispatch
from models import MambaLM, ModelConfig
from models.generation import sample_next
from models.typed_config import ConfigError

VARIANTS = {
    "baseline": {},
    "polar": {"polarize.ones": 1, "polarize.zeros": 1},
    "polar-reference": {"polarize.ones": 2, "polarize.zeros": 1, "polarize.zero_mode": "reference"},
}


def tiny(**overrides) -> MambaLM:
    return MambaLM(ModelConfig.preset("mamba-tiny", **overrides))


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_reproduces_parallel_forward(variant):
    model = tiny(**VARIANTS[variant]).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 21))
    with torch.no_grad():
        full = model(ids).logits
        states = model.new_states(3)
        prefix = model(ids[:, :7], states=states).logits
        torch.testing.assert_close(prefix, full[:, :7])
        for t in range(7, 21):
            torch.testing.assert_close(model.step(ids[:, t], states), full[:, t], rtol=1e-4, atol=1e-5)


def test_step_from_empty_state_matches_forward():
    model = tiny(**VARIANTS["polar"]).eval()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        full = model(ids).logits
        states = model.new_states(2)
        for t in range(9):
            torch.testing.assert_close(model.step(ids[:, t], states), full[:, t], rtol=1e-4, atol=1e-5)


def test_state_size_is_constant_per_token():
    model = tiny(**VARIANTS["polar"])
    states = model.new_states(1)
    sizes = {sum(s.conv.numel() + s.ssm.numel() for s in states)}
    with torch.no_grad():
        for t in range(30):
            model.step(torch.tensor([t]), states)
            sizes.add(sum(s.conv.numel() + s.ssm.numel() for s in states))
    assert len(sizes) == 1


def test_greedy_generate_is_deterministic_and_argmax():
    model = tiny(**VARIANTS["polar"]).eval()
    prompt = torch.randint(0, 512, (2, 5))
    out1 = model.generate(prompt, 12)
    out2 = model.generate(prompt, 12)
    assert torch.equal(out1, out2) and out1.shape == (2, 17)
    with torch.no_grad():  # each new token is the argmax of a full forward over what came before
        for t in range(5, 17):
            assert torch.equal(model(out1[:, :t]).logits[:, -1, :512].argmax(-1), out1[:, t])


def test_generate_stops_at_eos():
    model = tiny().eval()
    prompt = torch.randint(0, 512, (1, 4))
    first = model.generate(prompt, 1)[0, -1].item()
    out = model.generate(prompt, 10, eos_token_id=first)
    assert out.shape[1] == 5 and out[0, -1].item() == first


def test_sampling_respects_top_k_and_top_p():
    logits = torch.randn(4, 50)
    gen = torch.Generator().manual_seed(0)
    topk = logits.topk(5, dim=-1).indices
    for _ in range(50):
        s = sample_next(logits, temperature=1.0, top_k=5, generator=gen)
        assert all(s[i] in topk[i] for i in range(4))
    # top-p: the kept set is the smallest prefix of the sorted distribution with mass >= p
    probs = logits.softmax(-1)
    for _ in range(50):
        s = sample_next(logits, temperature=1.0, top_p=0.5, generator=gen)
        for i in range(4):
            p_sorted = probs[i].sort(descending=True).values
            k = int((p_sorted.cumsum(0) < 0.5).sum()) + 1
            assert probs[i, s[i]] >= p_sorted[k - 1]
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))


def test_sampling_distribution_matches_softmax():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_next(logits, temperature=2.0, generator=gen) for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    torch.testing.assert_close(freq, (logits[0] / 2).softmax(-1), atol=0.03, rtol=0)


def test_initialisation_follows_mamba_ssm():
    cfg = ModelConfig.preset("mamba-tiny", n_layer=4)
    model = MambaLM(cfg)
    mixer = model.backbone.layers[0].mixer
    torch.testing.assert_close(mixer.A_log[3], torch.log(torch.arange(1, 17, dtype=torch.float32)))
    assert torch.all(mixer.D == 1)
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= cfg.ssm.dt_init_floor * 0.999 and dt.max() <= cfg.ssm.dt_max * 1.001
    emb = model.backbone.embeddings.weight
    assert abs(emb.std().item() - 0.02) < 0.002
    assert model.lm_head.weight is emb
    # out_proj is rescaled by 1/sqrt(n_layer) relative to the default Linear init bound 1/sqrt(fan_in)
    bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer)
    assert mixer.out_proj.weight.abs().max() <= bound and mixer.out_proj.weight.abs().max() > 0.9 * bound


@pytest.mark.parametrize("variant", ["baseline", "polar", "polar-reference"])
@pytest.mark.parametrize("autocast", [False, True])
def test_loss_and_grads_finite(variant, autocast):
    model = tiny(**VARIANTS[variant])
    ids = torch.randint(0, 512, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(512)) < 1.0  # near-uniform at init
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_ssm_math_is_fp32_under_bf16_autocast(monkeypatch):
    seen = []
    real = dispatch.scan_ref.selective_scan_chunked

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((args[0].dtype, args[2].dtype))  # u in the activation dtype, A in fp32
        return out

    monkeypatch.setattr(dispatch.scan_ref, "selective_scan_chunked", spy)
    model = tiny(**VARIANTS["polar"])
    ids = torch.randint(0, 512, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    assert seen and all(u == torch.bfloat16 and a == torch.float32 for u, a in seen)
    for layer in model.backbone.layers:  # SSM parameters stay fp32
        assert layer.mixer.A_log.dtype == torch.float32 and layer.mixer.D.dtype == torch.float32


def test_loss_ignores_minus_100():
    model = tiny()
    ids = torch.randint(0, 512, (2, 10))
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, 5:].flatten(0, 1).float(), ids[:, 5:].flatten())
    torch.testing.assert_close(out.loss, expected)


def test_num_parameters_counts_unique():
    model = tiny(**VARIANTS["polar"])
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_parameters() == sum(unique.values())
    cfg = model.config
    # x_proj covers all N + 2 channels for B and C
    assert model.backbone.layers[0].mixer.x_proj.out_features == cfg.dt_rank + 2 * (16 + 2)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"n_layr": 2}, "did you mean 'n_layer'"),
        ({"ssm.d_state": 0}, "d_state must be > 0"),
        ({"polarize.ones": -1}, "polarize.ones must be >= 0"),
        ({"polarize.zero_mode": "approx"}, "not one of"),
        ({"d_model": 100}, "multiple of 8"),
        ({"n_layer": 2.5}, "expected an integer"),
        ({"ssm.polarize": 1}, "unknown config key .model.ssm.polarize.: valid keys"),
    ],
)
def test_bad_config_raises_clear_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.preset("mamba-tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="did you mean 'mamba-130m'"):
        ModelConfig.preset("mamba-13m")
