"""Training defaults that fit the data and the tools: the end-of-run sample prompt comes from the data (or the
config), and wandb gets the entity, group and tags the config names."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

from pretrain.callbacks import sample_prompt
from pretrain.data import PackedDataset, TokenShards
from pretrain.metrics import MetricsSink
from tokenizer import Tokenizer


def fake_trainer(data, prompt=None):
    """What sample_prompt reads: the config's logging and data sections and the datasets."""
    val = PackedDataset(TokenShards(data["path"], "val"), 32)
    cfg = SimpleNamespace(logging=SimpleNamespace(sample_prompt=prompt),
                          data=SimpleNamespace(tokenizer=data["tokenizer"]))
    return SimpleNamespace(cfg=cfg, val_data={"data": val}, mixture=None, tokenizer=Tokenizer.load(data["tokenizer"]))


def test_sample_prompt_is_the_start_of_a_validation_document(data):
    tok = Tokenizer.load(data["tokenizer"])
    shards = TokenShards(data["path"], "val")
    ids = [int(i) for i in shards.read(0, shards.num_tokens)]
    bounds = [-1] + [i for i, t in enumerate(ids) if t == tok.eos_id] + [len(ids)]
    docs = [tok.decode(ids[a + 1:b]) for a, b in zip(bounds, bounds[1:])]
    first_doc = next(d for d in docs if d.strip())
    first_line = next(line for line in first_doc.splitlines() if line.strip())
    prompt = sample_prompt(fake_trainer(data))
    assert prompt.strip() and first_line.startswith(prompt) and len(tok.encode(prompt)) <= 16
    assert sample_prompt(fake_trainer(data, "KING LEAR:")) == "KING LEAR:"


def test_wandb_gets_entity_group_and_tags(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(kw) or SimpleNamespace(log=lambda *a, **k: None, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = MetricsSink(tmp_path, {"x": 1}, "offline", "proj", 0, True,
                       wandb_args={"entity": "lab", "group": "sweep-1", "tags": ["polar", "130m"]})
    sink.close()
    (kw,) = calls
    assert (kw["entity"], kw["group"], kw["tags"], kw["project"], kw["mode"]) == ("lab", "sweep-1", ["polar", "130m"],
                                                                                 "proj", "offline")


def test_vocab_size_comes_from_the_tokenizer_when_unset(data):
    from pretrain.config import build_config

    vocab = Tokenizer.load(data["tokenizer"]).vocab_size
    base = {"data": {"path": data["path"], "tokenizer": data["tokenizer"]}}
    assert build_config({**base, "model": {"d_model": 32, "n_layer": 1}}).model.vocab_size == vocab
    assert build_config({**base, "model": {"preset": "mamba-130m"}}).model.vocab_size == vocab
    assert build_config({**base, "model": {"d_model": 32, "vocab_size": 1000}}).model.vocab_size == 1000
    assert build_config({**base, "model": {"preset": "mamba-130m"}}, {"model.vocab_size": 640}).model.vocab_size == 640
    assert build_config({"model": {"d_model": 32}}).model.vocab_size == 50277  # no tokenizer: the default
