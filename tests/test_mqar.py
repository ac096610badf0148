"""MQAR: the generator's semantics (zoology's multiquery_ar), configs, scoring, and that a short run learns."""

import json

import pytest
import torch

from eval.mqar import MQARConfig, MQARDataConfig, MQAROptimConfig, Stage, evaluate, load_mqar_config, train_model
from eval.mqar_data import IGNORE, multiquery_ar
from models.config import ModelConfig
from models.typed_config import ConfigError
from pretrain.cli import main


@pytest.mark.parametrize("V,L,kv", [(64, 64, 4), (256, 128, 32), (8192, 1024, 256)])
def test_keys_values_queries_and_labels(V, L, kv):
    x, y = multiquery_ar(V, L, kv, 16, seed=3)
    assert x.shape == y.shape == (16, L) and x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < V
    for inputs, labels in zip(x, y):
        keys, values = inputs[0:2 * kv:2], inputs[1:2 * kv:2]
        assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
        assert len(set(keys.tolist())) == kv  # distinct keys
        value_of = dict(zip(keys.tolist(), values.tolist()))
        query_pos = (labels != IGNORE).nonzero()[:, 0]
        assert len(query_pos) == kv and (query_pos >= 2 * kv).all() and ((query_pos - 2 * kv) % 2 == 0).all()
        assert sorted(inputs[query_pos].tolist()) == sorted(keys.tolist())  # each key queried exactly once
        for p in query_pos.tolist():
            assert labels[p] == value_of[int(inputs[p])]  # the label is the queried key's value
        assert (labels[: 2 * kv] == IGNORE).all()


def test_seeded_and_power_law_gaps():
    a, b, c = (multiquery_ar(128, 128, 8, 200, seed=s) for s in (5, 5, 6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    # power_a = 0.01: p(gap g) ∝ g^-0.99 puts most queries near the context (uniform would put half past the middle)
    gaps = ((a[1] != IGNORE).nonzero()[:, 1] - 16) // 2
    assert (gaps < 56 // 4).float().mean() > 0.6


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError, match="seq_len >= 4"):
        multiquery_ar(64, 16, 8, 1, 0)
    with pytest.raises(ConfigError, match="vocab_size"):
        MQARConfig(model=ModelConfig(vocab_size=64), data=MQARDataConfig(vocab_size=128))


@pytest.mark.parametrize("path", ["configs/mqar/cpu.yaml", "configs/mqar/paper.yaml"])
def test_sweep_configs_load(path):
    cfg = load_mqar_config(path, {"optim.lr": 2e-3})
    assert cfg.optim.lr == 2e-3 and set(cfg.sweep.variants) == {"default", "ones", "zeros", "both"}
    both = cfg.variant("both", 4).model
    assert (both.polarize.ones, both.polarize.zeros, both.n_layer) == (1, 1, 4)
    assert cfg.variant("default", 2).model.polarize.enabled is False


def test_perfect_model_scores_one():
    class Oracle(torch.nn.Module):  # predicts each label exactly: logits peak at the value after each key
        config = ModelConfig(vocab_size=64)

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids, labels=None, return_logits=True):
            out = torch.zeros(*ids.shape, 64)
            for b in range(ids.shape[0]):
                pairs = dict(zip(ids[b, 0:8:2].tolist(), ids[b, 1:8:2].tolist()))
                for t in range(8, ids.shape[1]):
                    out[b, t, pairs.get(int(ids[b, t]), 0)] = 1
            return type("Out", (), {"logits": out})

    data = MQARDataConfig(vocab_size=64, eval=[Stage(64, 4, 32)])
    assert evaluate(Oracle(), data)["average"] == 1.0


@pytest.mark.slow
def test_short_training_run_learns(tmp_path):
    V = 16
    cfg = MQARConfig(model=ModelConfig.preset("mamba-tiny", d_model=32, n_layer=1, vocab_size=V),
                     data=MQARDataConfig(vocab_size=V, train=[Stage(16, 2, 12800)], eval=[Stage(16, 2, 512)],
                                         batch_size=64),
                     optim=MQAROptimConfig(lr=1e-2, warmup_fraction=0.05), progress_bar=False)
    model, log = train_model(cfg)
    acc = evaluate(model, cfg.data)["average"]
    assert acc > 0.3, (acc, log.losses[::20])  # chance is 1 / (V/2) = 0.125


@pytest.mark.slow
def test_cli_sweep_writes_table(tmp_path, capsys):
    overrides = ["--run.out_dir", str(tmp_path), "--data.train", "[{seq_len: 16, num_kv_pairs: 2, num_examples: 64}]",
                 "--data.eval", "[{seq_len: 16, num_kv_pairs: 2, num_examples: 16}]", "--data.batch_size", "32",
                 "--progress_bar", "false"]
    assert main(["mqar", "train", "configs/mqar/cpu.yaml", "--variant", "default", "--variant", "both",
                 "--layers", "2", *overrides]) == 0
    out = tmp_path / "mqar-cpu"
    rows = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["n_layer"], r["steps"]) for r in rows] == [("default", 2, 2), ("both", 2, 2)]
    assert "| both | 2 |" in (out / "results.md").read_text()
    for _ in range(2):  # each scoring is kept, timestamped, beside the earlier ones
        assert main(["mqar", "eval", str(out / "both-L2")]) == 0
    kept = sorted((out / "both-L2").glob("mqar_eval_*.json"))
    assert len(kept) == 2 and all("average" in json.loads(p.read_text())["accuracy"] for p in kept)
    trained = (out / "both-L2" / "result.json").read_bytes()
    assert main(["mqar", "eval", "configs/mqar/cpu.yaml", *overrides]) == 0
    assert "| default | 2 |" in capsys.readouterr().out
    assert (out / "both-L2" / "result.json").read_bytes() == trained  # the training record stays
    assert len(list((out / "both-L2").glob("mqar_eval_*.json"))) == 3
