"""The paper's MQAR protocol as options (eval/mqar.py, models/mamba.py): each changes exactly what it says,
configs/mqar/paper.yaml is the paper's run, and the paper's init reproduces the paper's mechanism."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.diagnostics import recency
from eval.mqar import (
    MQARConfig,
    MQARDataConfig,
    MQAROptimConfig,
    Stage,
    batches,
    load_mqar_config,
    optimizer_groups,
    paper_comparison,
    plan,
    train_model,
)
from eval.mqar_data import IGNORE, multiquery_ar
from models.build import build_model
from models.config import ModelConfig
from models.hf import hf_config
from models.typed_config import ConfigError, apply_overrides

PAPER_SEGMENTS = [(64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000),
                  (512, 32, 20_000), (512, 64, 20_000), (512, 128, 20_000), (1024, 64, 20_000),
                  (1024, 128, 20_000), (1024, 256, 20_000)]


def _tiny(n_layer=2, **model):
    base = {"d_model": 64, "n_layer": n_layer, "vocab_size": 512}
    return build_model(ModelConfig.from_dict(apply_overrides(base, model)))


def _close_std(w: torch.Tensor, std: float) -> bool:
    """Sample std within 5 standard errors of ``std`` (se of a normal sample std: std / sqrt(2n))."""
    n = w.numel()
    return abs(w.std().item() - std) < 5 * std / math.sqrt(2 * n) and abs(w.mean().item()) < 5 * std / math.sqrt(n)


# Initialization and final norm ---------------------------------------------------------------------------
def test_zoology_init_is_normal_002_with_zero_biases_and_scaled_out_proj():
    n_layer = 3
    model, base = _tiny(n_layer, init="zoology", **{"ssm.proj_bias": True}), _tiny(n_layer)
    assert _close_std(model.backbone.embeddings.weight, 0.02)
    for layer, ref in zip(model.backbone.layers, base.backbone.layers):
        m = layer.mixer
        for lin in (m.in_proj, m.x_proj, m.dt_proj):
            assert _close_std(lin.weight, 0.02), lin
        assert _close_std(m.out_proj.weight, 0.02 / math.sqrt(2 * n_layer))
        for lin in (m.in_proj, m.dt_proj, m.out_proj):
            assert torch.equal(lin.bias, torch.zeros_like(lin.bias))  # dt_proj's too: Δ = softplus(0) + O(w)
        # the rest keeps mamba_ssm's init: S4D-real A, D = 1
        assert torch.equal(m.A_log, ref.mixer.A_log) and torch.equal(m.D, torch.ones_like(m.D))
    # mamba_ssm's init, by contrast: dt bias = softplus^-1(Δ) with Δ in [dt_min, dt_max]
    delta = F.softplus(base.backbone.layers[0].mixer.dt_proj.bias)
    assert delta.min() >= 1e-3 * 0.999 and delta.max() <= 0.1 * 1.001


def test_layernorm_final_norm_is_layernorm_of_the_stream():
    model = _tiny(final_norm="layernorm")
    with torch.no_grad():
        model.backbone.norm_f.weight.normal_()
        model.backbone.norm_f.bias.normal_()
    ids = torch.randint(0, 512, (2, 16))
    hidden, residual = model.backbone.embeddings(ids), None
    for layer in model.backbone.layers:
        hidden, residual = layer(hidden, residual)
    ref = F.layer_norm(hidden + residual, (64,), model.backbone.norm_f.weight, model.backbone.norm_f.bias, 1e-5)
    torch.testing.assert_close(model.backbone(ids), ref)
    assert not hasattr(_tiny().backbone.norm_f, "bias")  # the default stays RMSNorm
    with pytest.raises(ConfigError, match="final_norm"):
        hf_config(model.config)


def test_bad_model_options_are_refused():
    for bad in ({"init": "xavier"}, {"final_norm": "batchnorm"}):
        with pytest.raises(ConfigError, match="not one of"):
            ModelConfig.from_dict(bad)
    for arch in ("transformer", "mamba2"):  # init is Mamba-1's field (the paper's MQAR init)
        with pytest.raises(ConfigError, match=f"model.init is a field of arch mamba, not of {arch}"):
            ModelConfig.from_dict({"arch": arch, "init": "zoology"})


# Data ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("V,L,kv", [(64, 64, 4), (8192, 1024, 256)])
def test_zero_filler_is_zero_everywhere_but_context_and_queries(V, L, kv):
    seed = int(torch.randint(0, 2**31, ()))
    (xz, yz), (xr, yr) = (multiquery_ar(V, L, kv, 8, seed, filler=f) for f in ("zeros", "random"))
    filler = (yz == IGNORE)
    filler[:, : 2 * kv] = False  # context
    assert (xz[filler] == 0).all() and (xz[~filler] != 0).all()  # keys >= 1, values >= V/2
    assert (xr[filler] != 0).float().mean() > 0.9  # random filler is uniform over [0, V)
    assert torch.equal(yz, yr) and torch.equal(xz[~filler], xr[~filler])  # same pairs and queries


def test_batches_in_order_keep_the_remainder():
    assert [b.tolist() for b in batches(7, 3, None)] == [[0, 1, 2], [3, 4, 5], [6]]
    shuffled = torch.cat(batches(7, 3, torch.Generator().manual_seed(int(torch.randint(0, 99, ())))))
    assert sorted(shuffled.tolist()) == list(range(7))


# Optimizer, schedule, clipping, early stop ----------------------------------------------------------------
def _cfg(**optim) -> MQARConfig:
    V = 16
    return MQARConfig(model=ModelConfig.from_dict({"d_model": 16, "n_layer": 1, "vocab_size": V}),
                      data=MQARDataConfig(vocab_size=V, train=[Stage(16, 2, 70), Stage(32, 4, 40)],
                                          eval=[Stage(16, 2, 16)], batch_size=32, shuffle=False),
                      optim=MQAROptimConfig(**optim), progress_bar=False)


def test_per_epoch_cosine_matches_torch_scheduler_and_clipping_off(monkeypatch):
    clips = []
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: clips.append(1) or real_clip(*a, **k))
    cfg = _cfg(lr=3e-3, min_lr_ratio=0.1, schedule="epoch", epochs=3, grad_clip=0)
    _, log = train_model(cfg)
    per_epoch = 3 + 2  # ceil(70 / 32) + ceil(40 / 32): the remainder batches count
    assert len(log.lrs) == 3 * per_epoch and log.tokens == 3 * (70 * 16 + 40 * 32) and not clips
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3, eta_min=3e-4)
    expected = []
    for _ in range(3):
        expected += [opt.param_groups[0]["lr"]] * per_epoch
        opt.step()
        sched.step()
    np.testing.assert_allclose(log.lrs, expected, rtol=1e-12)
    _, log = train_model(_cfg(epochs=1, grad_clip=1.0))
    assert len(clips) == per_epoch and log.lrs[0] == 1e-3 and log.lrs[-1] == 0.0  # per-step cosine to 0


def test_early_stop_after_the_epoch_whose_eval_average_exceeds_the_threshold():
    _, log = train_model(_cfg(epochs=3, early_stop_accuracy=-1.0))  # any accuracy exceeds -1
    assert log.epochs == 1 and len(log.val_average) == 1 and len(log.losses) == 5
    _, log = train_model(_cfg(epochs=2, early_stop_accuracy=1.0))  # nothing exceeds 1
    assert log.epochs == 2 and len(log.val_average) == 2
    assert train_model(_cfg(epochs=2))[1].val_average == []  # no early stop: no per-epoch scoring


@pytest.mark.parametrize("which", ["all", "groups"])
def test_weight_decay_on_all_parameters_or_the_groups(which):
    model = _tiny()
    o = MQAROptimConfig(lr=0.5, weight_decay=0.1, weight_decay_params=which)
    opt = torch.optim.AdamW(optimizer_groups(model, o), lr=o.lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a zero gradient: AdamW moves a parameter only by its decay
    opt.step()
    for name, p in model.named_parameters():
        decays = which == "all" or (p.ndim >= 2 and "A_log" not in name)
        torch.testing.assert_close(p.detach(), before[name] * (1 - 0.05 if decays else 1.0), msg=name)


def test_bad_optim_options_are_refused():
    with pytest.raises(ConfigError, match="warmup"):
        MQAROptimConfig(schedule="epoch", warmup_fraction=0.1)
    with pytest.raises(ConfigError, match="grad_clip"):
        MQAROptimConfig(grad_clip=-1)


# The configs -----------------------------------------------------------------------------------------------
def test_paper_yaml_is_the_papers_run():
    cfg = load_mqar_config("configs/mqar/paper.yaml")
    d, o = cfg.data, cfg.optim
    assert [(s.seq_len, s.num_kv_pairs, s.num_examples) for s in d.train] == PAPER_SEGMENTS
    assert [(s.seq_len, s.num_kv_pairs, s.num_examples) for s in d.eval] == [(1024, 64, 1000), (1024, 128, 1000),
                                                                            (1024, 256, 1000)]
    assert (d.vocab_size, d.filler, d.shuffle, d.power_a, d.batch_size, d.eval_batch_size) == \
        (8192, "zeros", False, 0.01, 128, 16)
    assert (o.lr, o.weight_decay, o.weight_decay_params, o.betas, o.grad_clip, o.schedule, o.epochs,
            o.early_stop_accuracy, o.warmup_fraction, o.min_lr_ratio) == (1e-3, 0.1, "all", [0.9, 0.999], 0, "epoch",
                                                                           64, 0.99, 0.0, 0.0)
    both = cfg.variant("both", 4).model
    assert (both.d_model, both.ssm.d_state, both.init, both.final_norm, both.polarize.zero_mode) == \
        (128, 16, "zoology", "layernorm", "reference")
    assert load_mqar_config("configs/mqar/paper.yaml", {"model.polarize.zero_mode": "exact"}).variant(
        "both", 4).model.polarize.zero_mode == "exact"
    (row,) = plan(cfg, ["both"], [4])
    assert row["steps_per_epoch"] == 782 + 10 * 157  # ceil(100k / 128) + 10 x ceil(20k / 128)
    assert row["train_tokens_per_epoch"] == 100_000 * 64 + 20_000 * (128 + 3 * 256 + 3 * 512 + 3 * 1024)


def test_gpu_minutes_yaml_is_the_paper_protocol_shrunk():
    paper, small = load_mqar_config("configs/mqar/paper.yaml"), load_mqar_config("configs/mqar/gpu-minutes.yaml")
    for section in ("filler", "shuffle", "vocab_size"):
        assert getattr(small.data, section) == getattr(paper.data, section)
    for key in ("weight_decay_params", "grad_clip", "schedule", "early_stop_accuracy", "lr", "weight_decay"):
        assert getattr(small.optim, key) == getattr(paper.optim, key)
    cells = {v: small.variant(v, 4).model for v in small.sweep.variants}
    assert {v: (m.polarize.ones, m.polarize.zeros, m.polarize.zero_mode) for v, m in cells.items() if v != "default"} \
        == {"both": (1, 1, "exact"), "both-reference": (1, 1, "reference")}
    assert all((m.init, m.final_norm, m.d_model) == ("zoology", "layernorm", 128) for m in cells.values())


def test_paper_comparison_is_cell_for_cell():
    acc = {"L1024-kv64": 0.99, "L1024-kv128": 0.5, "L1024-kv256": 0.25}
    acc["average"] = sum(acc.values()) / 3
    rows = [{"variant": "both", "n_layer": 4, "accuracy": acc}, {"variant": "ones", "n_layer": 4, "accuracy": acc}]
    table = paper_comparison(rows)
    assert "| both | 4 | 99.00 | 99.94 | -0.94 | 50.00 | 98.80 | -48.80 | 25.00 | 81.56 | -56.56 |" in table
    assert "| ones | 4 |" not in table  # the paper has no such cell
    other = [{"variant": "both", "n_layer": 4, "accuracy": {"L128-kv4": 0.5, "average": 0.5}}]
    assert paper_comparison(other) == ""  # other eval stages are not the paper's cells


# The mechanism under the paper's init (§3: exponential recency; §4: the A = 1 channel) -------------------------
def test_zoology_init_forgets_within_tokens_unless_polarized():
    """At init under ``init: zoology`` Δ = softplus(~0) = ln 2, so the slowest learned channel (A = -1) keeps
    exp(-ln 2) = 1/2 of its state per token: a default mixer's influence |dy_t/dx_{t-d}| falls by 2 per token
    of distance (closed form: slope -ln 2 in log influence); the ones channel (A_t = 1) carries every token
    undamped, so the polarized mixer's influence stays flat. Under mamba_ssm's init (Δ <= 0.1) it decays slowly."""
    ids = torch.randint(0, 512, (2, 64))
    polar = {"polarize.ones": 1, "polarize.zeros": 1}
    cells = [("default", "zoology", {}), ("both", "zoology", polar), ("mamba_ssm", "mamba_ssm", {})]
    infl = {name: recency(_tiny(1, init=init, **pol), ids)[0] for name, init, pol in cells}
    d = np.arange(8, 41)
    slope = np.polyfit(d, np.log(infl["default"][d]), 1)[0]
    assert abs(slope + math.log(2)) < 0.05 * math.log(2), slope
    assert infl["default"][40] / infl["default"][8] < 2.0**-30
    assert infl["both"][40] / infl["both"][8] > 0.1
    assert infl["both"][40] / infl["default"][40] > 1e6  # orders of magnitude at 40 tokens
    assert infl["mamba_ssm"][40] / infl["mamba_ssm"][8] > 1e-2  # mamba_ssm's init: slow decay, the gap is small


def test_plan_prints_each_cells_cost_without_training(tmp_path, capsys):
    from pretrain.cli import main

    assert main(["mqar", "train", "configs/mqar/gpu-minutes.yaml", "--plan", "--run.out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    tokens = 20_000 * 64 + 4_000 * (128 + 3 * 256 + 3 * 512)
    assert f"| both-reference-L4 | 1,519,360 | {157 + 7 * 32} | {tokens:,} |" in out
    assert not any(tmp_path.iterdir())  # nothing trained or written


@pytest.mark.slow
def test_paper_protocol_trains_and_results_md_sits_beside_the_paper(tmp_path):
    """paper.yaml's options end to end (tiny: one short stage, 2 epochs, 2 examples per eval stage)."""
    import json

    from pretrain.cli import main

    evals = "[" + ", ".join(f"{{seq_len: 1024, num_kv_pairs: {k}, num_examples: 2}}" for k in (64, 128, 256)) + "]"
    assert main(["mqar", "train", "configs/mqar/paper.yaml", "--variant", "both", "--layers", "2",
                 "--run.out_dir", str(tmp_path), "--model.d_model", "16", "--optim.epochs", "2",
                 "--data.train", "[{seq_len: 16, num_kv_pairs: 2, num_examples: 200}]", "--data.eval", evals,
                 "--progress_bar", "false"]) == 0
    (row,) = json.loads((tmp_path / "mqar-paper" / "results.json").read_text())
    assert (row["steps"], row["epochs"], len(row["val_average"]), row["train_tokens"]) == (4, 2, 2, 2 * 200 * 16)
    assert row["tokens_per_second"] > 0
    md = (tmp_path / "mqar-paper" / "results.md").read_text()
    ours = 100 * row["accuracy"]["L1024-kv64"]
    assert f"| both | 2 | {ours:.2f} | 99.23 | {ours - 99.23:+.2f} |" in md
