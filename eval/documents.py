"""Validation loss on whole documents beside the packed-window loss (``polar eval documents``; issue 25).

Training packs documents end to end into windows of ``seq_len`` tokens, and the trainer's validation scores
the val split the same way: consecutive windows, the state carried across the documents inside a window
(``data.document_boundaries: carry``) or reset at each of them (``reset``). A model is used on one document
at a time, from a zero state. This evaluation reports both numbers on the held-out documents of a prepared
data folder (its val split, cut at its document index, ``TokenShards.document_ends``):

- ``whole``: every held-out document scored alone from a zero state, truncated to its first ``length + 1``
  tokens (``length`` defaults to the run's ``data.seq_len``): the mean next-token loss per scored token
  (``whole_per_document``: the mean of each document's mean, with its standard error over documents);
- ``packed``: the val split's consecutive windows of ``length + 1`` tokens in stream order, as the trainer's
  validation cuts them (``PackedDataset``), with resets at every document start when the run trained with
  them (``--packed trained``, the default), or as ``--packed carry|reset`` says; the mean loss per token.

Documents are batched right-padded: every model here is causal, so padding after a document changes none
of its positions, and padded positions are not scored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

PACKED = ("trained", "carry", "reset")


@dataclass
class DocumentsConfig:
    length: int = 1024  # tokens scored per document and per packed window (the training seq_len by default)
    documents: int = 0  # held-out documents scored whole, in stream order; 0: all
    windows: int = 0  # packed windows, in stream order; 0: all
    batch_size: int = 8
    packed: str = "trained"  # boundaries in the packed windows: as the run trained, carry or reset

    def __post_init__(self):
        if self.length < 1 or self.batch_size < 1 or min(self.documents, self.windows) < 0:
            raise ValueError(f"documents: need length and batch_size >= 1, documents and windows >= 0 (got "
                             f"{self.length}, {self.batch_size}, {self.documents}, {self.windows})")
        if self.packed not in PACKED:
            raise ValueError(f"documents: --packed {self.packed!r}: choose one of {', '.join(PACKED)}")


def split_documents(tokens: np.ndarray, ends: np.ndarray, length: int, count: int = 0) -> list[np.ndarray]:
    """The documents of a token stream (``ends``: exclusive ends, ascending) in order, each truncated to its first
    ``length + 1`` tokens (``length`` predictions); documents of one token (nothing to predict) are left out.
    ``count`` > 0 keeps the first ``count``."""
    docs, start = [], 0
    bounds = [int(e) for e in ends]
    if not bounds or bounds[-1] < len(tokens):  # a stream whose last document has no end recorded
        bounds.append(len(tokens))
    for end in bounds:
        if end - start > 1:
            docs.append(np.asarray(tokens[start:min(end, start + length + 1)], dtype=np.int64))
            if count and len(docs) == count:
                break
        start = end
    return docs


def _logits(model, ids, seq_idx=None):
    return model(ids, **({} if seq_idx is None else {"seq_idx": seq_idx})).logits.float()


def whole_document_loss(model, docs: list[np.ndarray], batch_size: int = 8, progress: bool = False) -> dict:
    """Each document from a zero state (its own forward pass, batched right-padded); the mean loss per token
    (``loss``), per document (``per_document`` and its ``stderr`` over documents), tokens and documents."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    if not docs:
        raise ValueError("documents: no held-out document has two tokens")
    device = next(model.parameters()).device
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))  # similar lengths together: little padding
    sums, counts = np.zeros(len(docs)), np.zeros(len(docs), dtype=np.int64)
    with torch.no_grad():
        for b in tqdm(range(0, len(order), batch_size), desc="documents", disable=not progress):
            idx = order[b:b + batch_size]
            width = max(len(docs[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            labels = torch.full((len(idx), width - 1), -100, dtype=torch.long)
            for row, i in enumerate(idx):
                doc = torch.from_numpy(docs[i])
                ids[row, :len(doc)] = doc
                labels[row, :len(doc) - 1] = doc[1:]
            logits = _logits(model, ids[:, :-1].to(device))
            loss = F.cross_entropy(logits.transpose(1, 2), labels.to(device), ignore_index=-100, reduction="none")
            sums[idx] = loss.sum(1).double().cpu().numpy()
            counts[idx] = (labels != -100).sum(1).numpy()
    means = sums / counts
    stderr = float(means.std(ddof=1) / math.sqrt(len(means))) if len(means) > 1 else None
    return {"loss": float(sums.sum() / counts.sum()), "per_document": float(means.mean()), "stderr": stderr,
            "tokens": int(counts.sum()), "documents": len(docs)}


def packed_window_loss(model, data, windows: int = 0, reset: bool = False, batch_size: int = 8,
                       progress: bool = False) -> dict:
    """The trainer's validation loss: windows ``0, 1, ...`` of ``data`` (a ``PackedDataset``) in stream order,
    with ``seq_idx`` (every document from a zero state) when ``reset``, else the state carried across the
    documents of a window; the mean loss per token, tokens and windows."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    n = min(windows, data.num_samples) if windows else data.num_samples
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for b in tqdm(range(0, n, batch_size), desc="packed windows", disable=not progress):
            idx = range(b, min(b + batch_size, n))
            batch = torch.from_numpy(np.stack([data.window(i).astype(np.int64) for i in idx])).to(device)
            seq_idx = torch.from_numpy(np.stack([data.seq_idx(i) for i in idx])).to(device) if reset else None
            logits = _logits(model, batch[:, :-1], seq_idx)
            total += float(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="sum"))
            count += batch[:, 1:].numel()
    return {"loss": total / count, "tokens": count, "windows": n, "boundaries": "reset" if reset else "carry"}


def run_documents(model, data_dir: str, cfg: DocumentsConfig, trained: str, progress: bool = True) -> dict:
    """Both losses on the val split of the prepared folder ``data_dir``; ``trained``: the run's
    ``data.document_boundaries`` (what ``--packed trained`` means)."""
    from pretrain.data import PackedDataset, TokenShards

    tokens = TokenShards(data_dir, "val")
    docs = split_documents(tokens.read(0, len(tokens)), tokens.document_ends(), cfg.length, cfg.documents)
    boundaries = trained if cfg.packed == "trained" else cfg.packed
    if boundaries == "reset" and not getattr(model, "document_resets", False):
        raise ValueError(f"documents: packed windows with resets need a model that resets at document boundaries; "
                         f"{type(model).__name__} does not: pass --packed carry")
    whole = whole_document_loss(model, docs, cfg.batch_size, progress)
    packed = packed_window_loss(model, PackedDataset(tokens, cfg.length), cfg.windows, boundaries == "reset",
                                cfg.batch_size, progress)
    return {"config": asdict(cfg), "trained_boundaries": trained, "whole": whole, "packed": packed}
