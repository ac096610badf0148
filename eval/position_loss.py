"""Loss by token position (``polar eval position_loss``): how well a model predicts token t of a long
held-out document as a function of t, up to many times its training length — where an SSM's state must
carry the document and a Transformer must extrapolate its positions.

Up to ``windows`` windows of ``length + 1`` tokens are cut from held-out documents (each window starts a
document or continues the previous window of the same one; none crosses a document's end) and each is scored
from its first token on: the prompt goes through in chunks of ``prefill_chunk`` tokens carrying the model's state
(eval.niah.prefill's scheme: flat memory for SSMs, a KV cache for Transformers), and every token's loss is
kept. Losses are averaged per position bucket (``per_octave`` log-spaced buckets per doubling of the
position, the first bucket [0, 1)), over all windows; the result records every bucket's mean loss, its
standard error over windows and the training length, and the plot marks that length.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class PositionLossConfig:
    length: int = 8192  # tokens scored per document
    windows: int = 8
    per_octave: int = 2  # buckets per doubling of the position
    prefill_chunk: int = 2048

    def __post_init__(self):
        if min(self.length, self.windows, self.per_octave, self.prefill_chunk) < 1:
            raise ValueError(f"position_loss: need length, windows, per_octave and prefill_chunk >= 1 "
                             f"(got {self.length}, {self.windows}, {self.per_octave}, {self.prefill_chunk})")


def bucket_edges(length: int, per_octave: int) -> list[int]:
    """Increasing integer edges 0, 1, ..., length: bucket i is positions [edges[i], edges[i+1])."""
    steps = math.ceil(math.log2(length) * per_octave) if length > 1 else 0
    inner = {round(2 ** (k / per_octave)) for k in range(steps + 1)}
    return sorted({0, *(e for e in inner if 0 < e < length), length})


def long_windows(tokens: np.ndarray, eos: int | None, length: int, count: int) -> list[np.ndarray]:
    """Up to ``count`` windows of ``length + 1`` tokens, each starting a held-out document (split at EOS) or
    continuing the window before it in the same document, never crossing a document's end."""
    cuts = np.flatnonzero(tokens == eos) if eos is not None and eos >= 0 else np.array([], dtype=np.int64)
    docs, start = [], 0
    for end in [*cuts.tolist(), len(tokens)]:
        for s in range(start, end - length, length + 1):
            if len(docs) < count:
                docs.append(tokens[s:s + length + 1])
        start = end + 1
    if not docs:
        raise ValueError(f"position_loss: no held-out document has {length + 1} tokens: lower --length or pass "
                         "--data with longer documents")
    return docs


def token_losses(model, ids, chunk: int):
    """Per-token next-token losses (L-1,) of one document, prefilled ``chunk`` tokens at a time from the state
    the previous chunk left."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    ids = torch.as_tensor(ids, device=device)[None]
    states = model.new_states(1)
    out = []
    with torch.no_grad():
        for start in range(0, ids.shape[1] - 1, chunk):
            hidden = model.backbone(ids[:, start:start + chunk], states)
            logits = model.lm_head(hidden)[0].float()
            target = ids[0, start + 1:start + 1 + logits.shape[0]]
            out.append(F.cross_entropy(logits[:len(target)], target, reduction="none"))
    return torch.cat(out).cpu().numpy()


def run_position_loss(model, tokens: np.ndarray, eos: int | None, cfg: PositionLossConfig,
                      train_length: int | None, progress: bool = True) -> dict:
    from tqdm import tqdm

    docs = long_windows(tokens, eos, cfg.length, cfg.windows)
    edges = bucket_edges(cfg.length, cfg.per_octave)
    per_doc = []
    for doc in tqdm(docs, desc="position_loss", disable=not progress):
        losses = token_losses(model, doc, cfg.prefill_chunk)
        per_doc.append([float(losses[a:b].mean()) for a, b in zip(edges, edges[1:], strict=False)])
    arr = np.asarray(per_doc)
    sem = arr.std(0, ddof=1) / math.sqrt(len(docs)) if len(docs) > 1 else np.full(arr.shape[1], np.nan)
    buckets = [{"start": a, "end": b, "loss": float(m), "stderr": None if math.isnan(s) else float(s)}
               for a, b, m, s in zip(edges[:-1], edges[1:], arr.mean(0), sem, strict=True)]
    return {"config": asdict(cfg), "windows": len(docs), "train_length": train_length, "buckets": buckets}


def draw(ax, result: dict, label: str) -> None:
    """One line: mean loss per bucket at the bucket's middle position, with standard-error bars."""
    b = result["buckets"]
    x = [(r["start"] + r["end"]) / 2 for r in b]
    err = [r["stderr"] for r in b]
    ax.errorbar(x, [r["loss"] for r in b], yerr=None if None in err else err, fmt="-o", ms=3, capsize=2,
                label=label)


def finish(ax, train_lengths: set[int]) -> None:
    for n in sorted(train_lengths):
        ax.axvline(n, color="grey", ls="--", lw=0.8, label=f"training length {n}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def write_position_loss(result: dict, out: Path, title: str, stem: str) -> list[Path]:
    from eval.results import json_file, write_files
    from eval.sweep import pyplot

    def plot(path: Path) -> None:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, result, title or "model")
        finish(ax, {result["train_length"]} - {None})
        ax.set_title(f"loss by position, {result['windows']} held-out windows")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    return write_files({out / f"{stem}.json": json_file(result), out / f"{stem}.png": plot})
