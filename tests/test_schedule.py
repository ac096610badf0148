"""Chinchilla budgeting, learning-rate schedules against closed forms, counted FLOPs against torch's counter."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from models import MambaLM, ModelConfig
from pretrain.config import build_config, load_config
from pretrain.metrics import forward_flops_per_token
from pretrain.schedule import lr_at, make_budget, plan


def cfg_with(**sections):
    return build_config({"model": {"preset": "mamba-tiny"}, **sections})


def test_chinchilla_budget_from_params():
    cfg = cfg_with(data={"seq_len": 100, "global_batch_size": 10})
    b = make_budget(cfg, params=1_000_000)
    assert b.tokens_per_step == 1000 and b.steps == 20_000 and b.tokens == 20_000_000
    cfg = build_config({"schedule": {"tokens": 12_345}, "data": {"seq_len": 100, "global_batch_size": 10}})
    b = make_budget(cfg, 1)
    assert b.steps == 13  # ceil


@pytest.mark.parametrize("size,steps,lr", [("130m", 4800, 3e-3), ("370m", 13500, 1.5e-3), ("550m", 20000, 1.25e-3)])
@pytest.mark.parametrize("polar", ["", "-polar"])
def test_table4_recipes(size, steps, lr, polar):
    cfg = load_config(f"configs/chinchilla-{size}{polar}.yaml")
    p = plan(cfg, mfu=0.4, gpu="H100", gpus=8)
    assert p["steps"] == steps and cfg.optim.lr == lr
    assert abs(p["tokens_per_step"] - 0.5e6) / 0.5e6 < 0.05
    assert (cfg.model.polarize.ones, cfg.model.polarize.zeros) == ((1, 1) if polar else (0, 0))
    lo, hi = {"130m": (100e6, 250e6), "370m": (250e6, 400e6), "550m": (400e6, 550e6)}[size]
    assert lo <= p["params"] <= hi


def test_cosine_schedule_closed_form():
    cfg = cfg_with(optim={"lr": 1.0, "min_lr_ratio": 0.1}, schedule={"steps": 110, "warmup_steps": 10})
    b = make_budget(cfg, 1)
    assert lr_at(0, cfg, b) == pytest.approx(0.1) and lr_at(9, cfg, b) == pytest.approx(1.0)
    for step in (10, 37, 60, 109):
        progress = (step - 10) / 99
        assert lr_at(step, cfg, b) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    assert lr_at(109, cfg, b) == pytest.approx(0.1)


def test_wsd_and_constant():
    cfg = cfg_with(optim={"lr": 2.0, "min_lr_ratio": 0.0}, schedule={"kind": "wsd", "steps": 100, "warmup_steps": 5,
                                                                     "decay_fraction": 0.2})
    b = make_budget(cfg, 1)
    assert all(lr_at(s, cfg, b) == 2.0 for s in range(5, 80))
    assert lr_at(99, cfg, b) == pytest.approx(0.0, abs=1e-12)
    decay = [lr_at(s, cfg, b) for s in range(80, 100)]
    assert all(a > c for a, c in zip(decay, decay[1:]))
    cfg = cfg_with(schedule={"kind": "constant", "steps": 10, "warmup_steps": 0})
    assert {lr_at(s, cfg, make_budget(cfg, 1)) for s in range(10)} == {cfg.optim.lr}


@pytest.mark.parametrize("overrides", [{}, {"polarize.ones": 1, "polarize.zeros": 1}])
def test_counted_flops_match_torch_flop_counter(overrides):
    """The projections, LM head and conv of our per-op count equal what torch's FLOP counter sees."""
    cfg = ModelConfig.preset("mamba-tiny", d_model=64, n_layer=3, vocab_size=1000, **overrides)
    model = MambaLM(cfg)
    B, L, k = 2, 16, cfg.ssm.d_conv
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(0, 1000, (B, L)))
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmuls = sum(n for op, n in by_op.items() if op.split(".")[1] in ("mm", "addmm", "matmul"))
    # elementwise work the counter does not see: the causal conv (shifted multiply-adds), scan and gate
    elementwise = 2 * cfg.d_inner * k + 9 * cfg.d_inner * cfg.d_state_total + 6 * cfg.d_inner
    assert forward_flops_per_token(cfg) == matmuls / (B * L) + cfg.n_layer * elementwise
