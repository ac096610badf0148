"""`polar eval recency`: a model that reads only its last k tokens loses nothing to spans before them and
something to spans inside them; corruption is a pure function of the seed and the span; target scores
match the model's own loss; the CLI writes the table and plot."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from eval.recency import RecencyConfig, corrupt, parse_fraction, run_recency, sample_windows, target_scores
from models.lm import LMOutput
from pretrain.cli import main

pytest_plugins = ["tests.eval_fixtures"]


class LastK(nn.Module):
    """logits_t = W · Σ_{j<k} c_j E[x_{t-j}]: depends on the last k tokens only."""

    def __init__(self, vocab: int, k: int, d: int = 16):
        super().__init__()
        self.k, self.emb, self.c = k, nn.Embedding(vocab, d), nn.Parameter(torch.randn(k))
        self.out = nn.Linear(d, vocab)

    def forward(self, ids):
        e = self.emb(ids)
        h = sum(self.c[j] * torch.nn.functional.pad(e, (0, 0, j, 0))[:, : e.shape[1]] for j in range(self.k))
        return LMOutput(logits=self.out(h))


def test_last_k_model_ignores_spans_before_its_window():
    vocab, k, context = 50, 5, 40
    model = LastK(vocab, k).eval()
    cfg = RecencyConfig(context=context, target=6, sizes=[4 / 40, 8 / 40], positions=9, windows=12, batch_size=5,
                        seed=int(torch.randint(0, 1000, ()).item()))
    tokens = np.random.default_rng(0).integers(0, vocab, 2000)
    result = run_recency(model, tokens, vocab, cfg, progress=False)
    before = [r for r in result["spans"] if r["end"] <= context - k]
    inside = [r for r in result["spans"] if r["end"] > context - k]
    assert before and inside
    assert all(r["loss_increase"] == 0.0 and r["acc_drop_rel"] == 0.0 for r in before)
    assert all(r["loss_increase"] != 0.0 for r in inside)
    assert result["spans"][-1]["end"] == context and result["spans"][0]["start"] == 0  # trailing and leading


def test_corruption_is_a_function_of_seed_and_span():
    windows = torch.randint(0, 100, (4, 30))
    a, b = corrupt(windows, 5, 12, 100, seed=7), corrupt(windows, 5, 12, 100, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, corrupt(windows, 5, 12, 100, seed=8))
    assert torch.equal(a[:, :5], windows[:, :5]) and torch.equal(a[:, 12:], windows[:, 12:])
    cfg = RecencyConfig(context=20, target=10, windows=6, seed=3)
    tokens = np.arange(500)
    assert torch.equal(sample_windows(tokens, cfg), sample_windows(tokens, cfg))


def test_target_scores_match_the_models_own_loss():
    from tests.eval_fixtures import tiny_model

    model = tiny_model()
    cfg = RecencyConfig(context=20, target=12, windows=5, batch_size=2)
    windows = torch.randint(0, 512, (5, 32))
    loss, acc = target_scores(model, windows, cfg)
    labels = windows[:, 1:].clone()
    labels[:, : cfg.context - 1] = -100  # only the target window is scored
    with torch.no_grad():
        out = model(windows[:, :-1], labels=labels)
    assert loss == pytest.approx(float(out.loss), rel=1e-5)
    hits = (out.logits[:, cfg.context - 1:].argmax(-1) == windows[:, cfg.context:]).float().mean()
    assert acc == pytest.approx(float(hits))


def test_bad_sizes_fail_in_one_line():
    with pytest.raises(ValueError, match="fraction"):
        parse_fraction("32 of 1024")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        parse_fraction("2")


@pytest.mark.slow
def test_cli_writes_table_json_and_plot(tiny_export, tmp_path):
    out = tmp_path / "rec"
    argv = ["eval", "recency", str(tiny_export), "--context", "24", "--target", "8", "--sizes", "4/24",
            "--positions", "3", "--windows", "4", "--data", "builtin", "--out", str(out)]
    assert main(argv) == 0
    (first,) = out.glob("recency_*.json")  # kept under a timestamped name, as every evaluation result
    result = json.loads(first.read_text())
    assert [(r["start"], r["end"]) for r in result["spans"]] == [(0, 4), (10, 14), (20, 24)]
    assert result["evaluation"] == "recency" and result["options"] == argv[3:-2]  # settings only, as typed
    assert "first 4 tok" in first.with_suffix(".md").read_text() and first.with_suffix(".png").stat().st_size > 0
    assert main(argv) == 0  # deterministic; the first result is kept beside the second
    (second,) = set(out.glob("recency_*.json")) - {first}

    def scores(path):
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "date"}

    assert scores(second) == scores(first)
