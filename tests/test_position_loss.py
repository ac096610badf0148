"""`polar eval position_loss` (eval/position_loss.py, eval/kinds/position_loss.py): chunked, state-carrying
scoring gives each token the loss of one full forward pass, buckets average exactly the positions they
name, windows never cross a document's end, Transformers refuse lengths past their positions, and the
command writes its files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.position_loss import PositionLossConfig, bucket_edges, long_windows, run_position_loss, token_losses

pytest_plugins = ["tests.eval_fixtures"]


def tiny_model():
    from tests.eval_fixtures import tiny_model  # imported late: pytest loads the module as a plugin first

    return tiny_model()


def full_pass_losses(model, ids: np.ndarray) -> np.ndarray:
    """Independent reference: one forward over the whole window, cross-entropy of every next token."""
    x = torch.as_tensor(ids)[None]
    with torch.no_grad():
        logits = model(x[:, :-1]).logits[0].float()
    return F.cross_entropy(logits, x[0, 1:], reduction="none").numpy()


def test_chunked_losses_equal_one_forward_pass(np_rng):
    """Catches a chunk that starts from a fresh state (losses past the first chunk would jump) or targets
    shifted by one at chunk borders."""
    model = tiny_model()
    ids = np_rng.integers(0, 512, int(np_rng.integers(40, 90)))
    for chunk in (1, int(np_rng.integers(2, 30)), 1000):
        np.testing.assert_allclose(token_losses(model, ids, chunk), full_pass_losses(model, ids), atol=2e-4)


def test_buckets_cover_every_position_once_and_windows_stay_in_documents(np_rng):
    """Catches a bucket edge dropped or repeated (positions counted twice or never), log spacing that is
    not per doubling, and windows that span an EOS (their late positions would score a new document)."""
    length, per_octave = int(np_rng.integers(50, 5000)), int(np_rng.integers(1, 4))
    edges = bucket_edges(length, per_octave)
    assert edges[0] == 0 and edges[-1] == length and all(a < b for a, b in zip(edges, edges[1:]))
    assert len([e for e in edges if 16 < e <= 32]) == per_octave
    eos, n = 3, 20
    docs = [np_rng.integers(4, 512, int(np_rng.integers(5, 70))) for _ in range(8)]
    stream = np.concatenate([np.append(d, eos) for d in docs])
    windows = long_windows(stream, eos, n, 100)
    assert len(windows) == sum(len(d) // (n + 1) for d in docs)
    assert all(len(w) == n + 1 and eos not in w for w in windows)
    with pytest.raises(ValueError, match="no held-out document"):
        long_windows(stream, eos, 1000, 1)


def test_bucket_means_are_the_hand_computed_means(np_rng):
    """run_position_loss's bucket losses are the means over windows of each window's mean over the bucket's
    positions, from an independent full-pass computation. Catches buckets averaging the wrong positions."""
    model = tiny_model()
    length = int(np_rng.integers(30, 70))
    stream = np_rng.integers(4, 512, 3 * (length + 1) + 5)
    cfg = PositionLossConfig(length=length, windows=3, per_octave=2, prefill_chunk=int(np_rng.integers(5, 40)))
    result = run_position_loss(model, stream, 3, cfg, train_length=16, progress=False)
    ref = [full_pass_losses(model, stream[i * (length + 1):(i + 1) * (length + 1)]) for i in range(3)]
    for b in result["buckets"]:
        per_window = [r[b["start"]:b["end"]].mean() for r in ref]
        assert b["loss"] == pytest.approx(np.mean(per_window), abs=2e-4)
        assert b["stderr"] == pytest.approx(np.std(per_window, ddof=1) / 3 ** 0.5, abs=2e-4)
    assert result["windows"] == 3 and result["train_length"] == 16


def test_transformers_refuse_lengths_past_their_positions():
    """Catches a stock Transformer scored past max_position_embeddings (an index error deep in transformers,
    or silently meaningless numbers) instead of a one-line refusal."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from eval.hf_targets import HFCausalLM, check_positions

    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    model = HFCausalLM(GPTNeoXForCausalLM(cfg))
    check_positions(model, 64, "position_loss")
    with pytest.raises(ValueError, match="65 tokens exceed the model's 64 positions"):
        check_positions(model, 65, "position_loss")
    check_positions(tiny_model(), 10**6, "position_loss")  # our SSM: no position limit


@pytest.mark.slow
def test_polar_eval_position_loss_writes_its_files(tiny_run, tmp_path):
    from eval.registry import get
    from pretrain.cli import main

    out = tmp_path / "out"
    options = ["--length", "200", "--windows", "2", "--train-length", "64", "--prefill-chunk", "64"]
    assert main(["eval", "position_loss", str(tiny_run), *options, "--out", str(out)]) == 0
    (path,) = out.glob("position_loss_*.json")
    data = json.loads(path.read_text())
    assert data["options"] == options and data["train_length"] == 64 and data["windows"] == 2
    assert path.with_suffix(".png").is_file()
    scores = get("position_loss").summarize(data)
    assert {"position_loss/within", "position_loss/beyond"} <= set(scores)
