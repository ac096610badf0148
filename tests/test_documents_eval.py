"""`polar eval documents` (eval/documents.py, eval/kinds/documents.py): the whole-document loss is each held-out
document's own forward pass from a zero state, truncated to the length, averaged per token; the packed-window
loss is the trainer's windows in stream order, carried or reset as asked; both are checked against slow loops
over the model's own forward, and the command writes its result."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eval.documents import DocumentsConfig, packed_window_loss, run_documents, split_documents, whole_document_loss

pytest_plugins = ["tests.eval_fixtures"]
EOS = 3


def tiny_model():
    from tests.eval_fixtures import tiny_model  # imported late: pytest loads the module as a plugin first

    return tiny_model()


def write_val_split(root: Path, docs: list[np.ndarray]) -> Path:
    """A prepared folder (format v2) whose val split is ``docs``, each ended by EOS, with its document index."""
    root.mkdir(parents=True, exist_ok=True)
    tokens = np.concatenate([np.append(d, EOS) for d in docs]).astype("<u2")
    ends = np.cumsum([len(d) + 1 for d in docs]).astype("<u8")
    (root / "val_00000.bin").write_bytes(tokens.tobytes())
    (root / "val_00000.idx").write_bytes(ends.tobytes())
    shard = {"file": "val_00000.bin", "tokens": len(tokens), "sha256": hashlib.sha256(tokens.tobytes()).hexdigest(),
             "max_id": int(tokens.max()), "index": "val_00000.idx", "document_ends": len(ends)}
    manifest = {"format": "polar-tokens", "version": 2, "tokenizer": {"fingerprint": "ab" * 32, "vocab_size": 512},
                "dtype": "<u2", "eos_id": EOS, "splits": {"val": {"documents": len(docs), "tokens": len(tokens),
                                                                  "shards": [shard]}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def random_docs(np_rng, n: int, longest: int) -> list[np.ndarray]:
    """Documents of 0 to ``longest`` tokens (an empty one is EOS alone: nothing to predict)."""
    return [np_rng.integers(4, 512, int(np_rng.integers(0, longest + 1))) for _ in range(n)]


def losses_of(model, ids: np.ndarray, seq_idx: np.ndarray | None = None) -> torch.Tensor:
    """Independent reference: one forward of ``ids[:-1]`` (batch 1), every next token's loss."""
    x = torch.as_tensor(ids, dtype=torch.long)[None]
    kw = {} if seq_idx is None else {"seq_idx": torch.as_tensor(seq_idx, dtype=torch.int32)[None]}
    with torch.no_grad():
        logits = model(x[:, :-1], **kw).logits[0].float()
    return F.cross_entropy(logits, x[0, 1:], reduction="none")


def test_whole_documents_are_each_scored_alone_from_a_zero_state(np_rng, tmp_path):
    """The batched, right-padded whole-document loss equals a loop of one forward per document (its first
    length + 1 tokens with the EOS ending it, from a fresh state), averaged per token. Catches padding that
    leaks into a document, documents cut at the wrong place, the EOS left out or a document scored twice."""
    model = tiny_model()
    docs, length = random_docs(np_rng, 13, 40), int(np_rng.integers(8, 30))
    data = write_val_split(tmp_path / "data", docs)
    from pretrain.data import TokenShards

    tokens = TokenShards(data, "val")
    cut = split_documents(tokens.read(0, len(tokens)), tokens.document_ends(), length)
    expected = [np.append(d, EOS)[:length + 1] for d in docs if len(d) >= 1]
    assert len(cut) == len(expected) and all(np.array_equal(a, b) for a, b in zip(cut, expected, strict=True))
    ref = [losses_of(model, d) for d in expected]
    got = whole_document_loss(model, cut, batch_size=int(np_rng.integers(2, 6)))
    assert got["tokens"] == sum(len(r) for r in ref) and got["documents"] == len(expected)
    assert got["loss"] == pytest.approx(float(torch.cat(ref).mean()), abs=1e-5)
    assert got["per_document"] == pytest.approx(float(torch.stack([r.mean() for r in ref]).mean()), abs=1e-5)
    first = split_documents(tokens.read(0, len(tokens)), tokens.document_ends(), length, count=2)
    assert len(first) == 2 and all(np.array_equal(a, b) for a, b in zip(first, cut, strict=False))


def test_packed_windows_carry_or_reset_as_asked(np_rng, tmp_path):
    """Packed windows are the trainer's (window i = tokens [i L, (i + 1) L]); carry is one forward per window,
    reset runs each document piece of a window alone from a zero state (a loop over pieces, no seq_idx).
    Catches resets applied in carry (or not in reset), windows shifted, or windows dropped."""
    from pretrain.data import PackedDataset, TokenShards

    model = tiny_model()
    docs, length = random_docs(np_rng, 20, 12), int(np_rng.integers(16, 40))  # several documents per window
    tokens = TokenShards(write_val_split(tmp_path / "data", docs), "val")
    data = PackedDataset(tokens, length)
    stream = tokens.read(0, len(tokens)).astype(np.int64)
    windows = [stream[i * length:(i + 1) * length + 1] for i in range(data.num_samples)]
    carry = torch.cat([losses_of(model, w) for w in windows])
    pieces = []
    for w in windows:  # each document piece alone: inputs cut after every EOS, each piece's own forward pass
        cuts = [0, *(p + 1 for p in np.flatnonzero(w[:-1] == EOS)), length]
        pieces += [losses_of(model, w[a:b + 1]) for a, b in zip(cuts, cuts[1:]) if b > a]
    reset = torch.cat(pieces)
    assert len(reset) == len(carry) == data.num_samples * length
    for mode, ref in (("carry", carry), ("reset", reset)):
        got = packed_window_loss(model, data, reset=mode == "reset", batch_size=int(np_rng.integers(1, 4)))
        assert got["loss"] == pytest.approx(float(ref.mean()), abs=1e-5), mode
        assert got["windows"] == data.num_samples and got["boundaries"] == mode
    assert float((carry - reset).abs().max()) > 1e-3  # the two modes differ on this data
    assert packed_window_loss(model, data, windows=2)["tokens"] == 2 * length


def test_packed_follows_the_runs_boundaries_unless_told(np_rng, tmp_path):
    """--packed trained reads the run's data.document_boundaries; a model that cannot reset is refused."""
    model = tiny_model()
    data = str(write_val_split(tmp_path / "data", random_docs(np_rng, 10, 12)))
    cfg = DocumentsConfig(length=16)
    assert run_documents(model, data, cfg, "reset", progress=False)["packed"]["boundaries"] == "reset"
    assert run_documents(model, data, cfg, "carry", progress=False)["packed"]["boundaries"] == "carry"
    forced = DocumentsConfig(length=16, packed="carry")
    assert run_documents(model, data, forced, "reset", progress=False)["packed"]["boundaries"] == "carry"
    with pytest.raises(ValueError, match="choose one of"):
        DocumentsConfig(packed="sometimes")

    class NoResets(torch.nn.Module):  # a model without seq_idx (a Transformer, a Hub model)
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, ids):
            return self.inner(ids)

    with pytest.raises(ValueError, match="pass --packed carry"):
        run_documents(NoResets(), data, cfg, "reset", progress=False)
    assert run_documents(NoResets(), data, cfg, "carry", progress=False)["packed"]["boundaries"] == "carry"


def test_polar_eval_documents_writes_its_result(tiny_run, tmp_path, np_rng):
    """`polar eval documents RUN --data DIR` writes documents_<time>.json with both losses and their scores."""
    from eval.registry import get
    from pretrain.cli import main

    data = write_val_split(tmp_path / "data", random_docs(np_rng, 12, 30))
    out = tmp_path / "out"
    options = ["--data", str(data), "--length", "24", "--batch-size", "4"]
    assert main(["eval", "documents", str(tiny_run), *options, "--out", str(out)]) == 0
    (path,) = out.glob("documents_*.json")
    result = json.loads(path.read_text())
    assert result["options"] == options and result["config"]["length"] == 24
    assert result["packed"]["boundaries"] == "carry" and result["whole"]["documents"] > 0
    kind = get("documents")
    assert {"documents/whole", "documents/packed"} <= set(kind.summarize(result))
    assert "| whole documents, each from a zero state |" in "\n".join(kind.card_section([result], 5))
    assert kind.reproduce(result, tiny_run, 5).endswith(f"--step 5 --data {data} --length 24 --batch-size 4")
