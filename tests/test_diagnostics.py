"""Diagnostics against closed forms: exponential recency exp(Δ·A·d) for one learned channel, none for a
ones channel, zero smoothness for identical tokens; and the `polar diagnose` outputs."""

import json
import math

import numpy as np
import pytest
import torch

from eval.diagnostics import a_range, oversmoothing, recency, smoothness
from models import ModelConfig, build_model
from pretrain.cli import main


def constant_delta_model(delta: float, A: float, **overrides):
    """One Mamba layer whose Δ is ``delta`` at every position (zero dt_proj weight, inverse-softplus bias)
    and whose learned channels all have transition exp(Δ·A)."""
    cfg = ModelConfig.preset("mamba-tiny", d_model=32, n_layer=1, vocab_size=64, **{"ssm.d_state": 1, **overrides})
    model = build_model(cfg).eval()
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        mixer.dt_proj.weight.zero_()
        mixer.dt_proj.bias.fill_(math.log(math.expm1(delta)))
        mixer.A_log.fill_(math.log(-A))
    return model


def slope(curve: np.ndarray, lo: int, hi: int) -> float:
    d = np.arange(lo, hi)
    return float(np.polyfit(d, np.log(curve[lo:hi]), 1)[0])


@pytest.mark.parametrize("delta,A", [(0.1, -1.0), (0.05, -2.0), (0.2, -0.3)])
def test_recency_decays_as_exp_delta_A(delta, A):
    model = constant_delta_model(delta, A)
    ids = torch.full((1, 64), 7)  # constant input: C_t and the gate are the same at every position
    influence = recency(model, ids)[0]
    # beyond the conv window (d_conv = 4) the only path from x_s to y_t is the state, scaled by exp(Δ·A) per step
    assert slope(influence, 6, 50) == pytest.approx(delta * A, rel=1e-3)


def test_ones_channel_does_not_decay():
    model = constant_delta_model(0.1, -1.0, **{"polarize.ones": 1})
    x_proj = model.backbone.layers[0].mixer.x_proj
    R, n_total = model.config.dt_rank, model.config.d_state_total
    with torch.no_grad():  # silence the learned channel: its B rows (after the ones channel) are zero
        x_proj.weight[R + 1: R + n_total].zero_()
    influence = recency(model, torch.full((1, 64), 7))[0]
    assert abs(slope(influence, 6, 50)) < 1e-5
    np.testing.assert_allclose(influence[6:50], influence[6], rtol=1e-4)


def test_smoothness_closed_forms():
    h = torch.randn(1, 1, 16).expand(2, 10, 16)
    assert smoothness(h) == 0.0
    two = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])  # distance 2, mean norm 1
    assert smoothness(two) == pytest.approx(2.0)


@pytest.mark.parametrize("arch", ["mamba-tiny", "mamba-tiny-polar", "transformer-tiny"])
def test_diagnostics_shapes(arch):
    model = build_model(ModelConfig.preset(arch, n_layer=3)).eval()
    ids = torch.randint(0, 512, (2, 24))
    assert recency(model, ids).shape == (3, 24)
    o = oversmoothing(model, ids)
    assert len(o["mixer"]) == len(o["block"]) == 3 and all(v > 0 for v in o["block"])
    r = a_range(model, ids)
    if arch.startswith("transformer"):
        assert r is None
    else:
        assert len(r) == 3 and all(0 <= v <= 1 for v in r[0]) and len(r[0]) == 2 * model.config.d_inner * 16


@pytest.mark.slow
def test_diagnose_cli_writes_json_and_png(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {preset: mamba-tiny-polar, n_layer: 2}\n")
    tcfg = tmp_path / "tf.yaml"
    tcfg.write_text("model: {preset: transformer-tiny}\n")
    out = tmp_path / "diag"
    assert main(["diagnose", str(cfg), str(tcfg), "--out", str(out), "--batch", "2", "--seq-len", "32"]) == 0
    for kind in ("recency", "oversmoothing", "a_range"):
        assert (out / f"{kind}.png").stat().st_size > 0
    assert set(json.loads((out / "oversmoothing.json").read_text())) == {"tiny", "tf"}
    assert set(json.loads((out / "a_range.json").read_text())) == {"tiny"}  # Mamba only
    before = (out / "oversmoothing.json").read_bytes()
    assert main(["diagnose", str(cfg), "--out", str(out)]) == 2  # kept: replaced only with --force
    assert (out / "oversmoothing.json").read_bytes() == before
    assert main(["diagnose", str(cfg), "--out", str(out), "--force", "--batch", "2", "--seq-len", "32"]) == 0
    assert set(json.loads((out / "oversmoothing.json").read_text())) == {"tiny"}


def test_diagnose_keeps_every_result_under_the_step(tmp_path, monkeypatch):
    """Without --out each diagnosis is a new diagnose_<time>/ beside the earlier ones (like eval results)."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("model: {preset: mamba-tiny-polar, n_layer: 1, d_model: 16}\n")
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["diagnose", str(cfg), "--batch", "1", "--seq-len", "8"]) == 0
    kept = sorted(p.name for p in (tmp_path / "runs" / "diagnose" / "tiny").iterdir())
    assert len(kept) == 2 and all(k.startswith("diagnose_") for k in kept)
