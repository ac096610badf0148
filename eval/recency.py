"""Recency as a robustness problem (``polar eval recency``): the paper's Table 1/3 experiment for language models.

Wang et al. (2025, Table 1, 3) replace a span of a sequential-CIFAR input with noise and find trailing spans
ruin SSMs while leading spans hurt the Transformer more. Here the input is held-out text: windows of
``context`` tokens followed by a fixed ``target`` window. A span of the context, ``size`` x context long
(sizes as fractions, like the paper's 32/1024 and 96/1024), is replaced by uniformly random tokens, at
``positions`` evenly spaced starts from leading (start 0) to trailing (ending at the context's end), and
the loss and top-1 accuracy of next-token prediction on the target window are compared with the clean
windows. A model that reads only the recent past loses most to trailing spans.

Everything is deterministic given the seed: which windows, and the random tokens of each (size, start).
Outputs (`polar eval recency`: recency_<time>.*, eval/kinds/recency.py): .json (config, clean and per-span
scores), .md (a Table-1-like table: leading, middle and trailing span per size) and .png (relative drop vs
span position, one line per size).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


def parse_fraction(text: str) -> float:
    """"32/1024" or "0.03125" -> 0.03125; a one-line error otherwise."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"recency: span size {text!r} is not a fraction like 32/1024 or 0.05") from None
    if not 0 < value < 1:
        raise ValueError(f"recency: span size {text} must be a fraction of the context in (0, 1)")
    return value


@dataclass
class RecencyConfig:
    context: int = 1024  # L: tokens before the target window (the paper's 1,024 pixels)
    target: int = 64  # tokens scored after the context
    sizes: list[float] = field(default_factory=lambda: [32 / 1024, 96 / 1024])  # span sizes, fractions of L
    positions: int = 9  # span starts from leading to trailing (odd: includes the middle)
    windows: int = 64  # held-out windows averaged over
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.context < 2 or self.target < 1 or self.windows < 1 or self.batch_size < 1:
            raise ValueError(f"recency: need context >= 2, target, windows and batch size >= 1 (got context="
                             f"{self.context}, target={self.target}, windows={self.windows}, batch={self.batch_size})")
        if self.positions < 2:
            raise ValueError(f"recency: --positions {self.positions}: need at least 2 (leading and trailing)")

    def spans(self) -> list[tuple[float, int, int]]:
        """(size, start, end) token spans of the context, for every size and position."""
        out = []
        for size in self.sizes:
            n = max(1, round(size * self.context))
            starts = np.linspace(0, self.context - n, self.positions).round().astype(int)
            out += [(size, int(s), int(s) + n) for s in dict.fromkeys(starts.tolist())]
        return out


# -- data -------------------------------------------------------------------------------------------------
def held_out_tokens(spec: str, tok) -> np.ndarray:
    """Token stream to cut windows from: a prepared data folder's val split (``polar prepare``), or text
    tokenized with the target's tokenizer: 'builtin' (the builtin corpus's documents `polar prepare` holds
    out at its default --val-fraction 0.01) or a text file."""
    path = Path(spec)
    if (path / "manifest.json").is_file():
        from pretrain.data import TokenShards

        shards = TokenShards(path, "val")
        return shards.read(0, len(shards)).astype(np.int64)
    if spec == "builtin":
        from pretrain.prepare import is_val
        from tokenizer.sources import iter_documents

        docs = [d for i, d in enumerate(iter_documents("builtin:shakespeare")) if is_val(i, 0.01)]
    elif path.is_file():
        docs = [path.read_text(encoding="utf-8")]
    else:
        raise FileNotFoundError(f"recency: --data {spec}: not a prepared data folder, 'builtin' or a text file")
    eos = [tok.eos_id] if tok.eos_id is not None and tok.eos_id >= 0 else []
    return np.asarray([t for d in docs for t in [*tok.encode(d), *eos]], dtype=np.int64)


def sample_windows(tokens: np.ndarray, cfg: RecencyConfig) -> torch.Tensor:
    """(windows, context + target) token windows at seeded random offsets."""
    length = cfg.context + cfg.target
    if len(tokens) < length:
        raise ValueError(f"recency: the held-out data has {len(tokens)} tokens, fewer than one window "
                         f"({cfg.context} + {cfg.target}): lower --context or pass more --data")
    starts = np.random.default_rng(cfg.seed).integers(0, len(tokens) - length + 1, cfg.windows)
    return torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]))


def corrupt(windows: torch.Tensor, start: int, end: int, vocab_size: int, seed: int) -> torch.Tensor:
    """``windows`` with tokens [start, end) replaced by uniform random tokens, the same for a given seed/span."""
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, start, end]).generate_state(1)[0]))
    out = windows.clone()
    out[:, start:end] = torch.randint(0, vocab_size, (windows.shape[0], end - start), generator=g)
    return out


# -- scoring ----------------------------------------------------------------------------------------------
@torch.no_grad()
def target_scores(model: torch.nn.Module, windows: torch.Tensor, cfg: RecencyConfig) -> tuple[float, float]:
    """Mean next-token loss and top-1 accuracy over the target window (positions context .. end)."""
    device = next(model.parameters()).device
    losses, hits = [], []
    for i in range(0, len(windows), cfg.batch_size):
        batch = windows[i:i + cfg.batch_size].to(device)
        logits = model(batch[:, :-1]).logits[:, cfg.context - 1:].float()
        target = batch[:, cfg.context:]
        losses.append(F.cross_entropy(logits.transpose(1, 2), target, reduction="none").cpu())
        hits.append((logits.argmax(-1) == target).float().cpu())
    return float(torch.cat(losses).mean()), float(torch.cat(hits).mean())


def run_recency(model: torch.nn.Module, tokens: np.ndarray, vocab_size: int, cfg: RecencyConfig,
                progress: bool = True) -> dict:
    """Clean and per-span scores; returns {"config", "clean", "spans"}."""
    windows = sample_windows(tokens, cfg)
    loss0, acc0 = target_scores(model, windows, cfg)
    rows = []
    for size, start, end in tqdm(cfg.spans(), desc="recency", disable=not progress):
        loss, acc = target_scores(model, corrupt(windows, start, end, vocab_size, cfg.seed), cfg)
        rows.append({"size": size, "start": start, "end": end, "center": (start + end) / 2 / cfg.context,
                     "loss": loss, "acc": acc, "loss_increase": loss - loss0,
                     "acc_drop_rel": (acc0 - acc) / acc0 if acc0 > 0 else 0.0})
    return {"config": asdict(cfg), "clean": {"loss": loss0, "acc": acc0}, "spans": rows}


# -- outputs ----------------------------------------------------------------------------------------------
def size_label(size: float, context: int) -> str:
    return f"{max(1, round(size * context))} tok ({Fraction(size).limit_denominator(4096)})"


def markdown_table(result: dict) -> str:
    """Table 1's layout: clean, then the leading / middle / trailing span of each size (accuracy, relative
    accuracy drop, and loss increase)."""
    cfg, clean = result["config"], result["clean"]
    head = ["clean"]
    cells = [f"{clean['acc']:.3f} / {clean['loss']:.3f}"]
    for size in cfg["sizes"]:
        rows = [r for r in result["spans"] if r["size"] == size]
        for name, r in (("first", rows[0]), ("middle", rows[len(rows) // 2]), ("last", rows[-1])):
            head.append(f"{name} {size_label(size, cfg['context'])} [{r['start']}:{r['end']}]")
            cells.append(f"{r['acc']:.3f} / {r['loss']:.3f} "
                         f"({-100 * r['acc_drop_rel']:+.1f}%, {r['loss_increase']:+.3f})")
    return ("top-1 accuracy / loss on the target window (relative accuracy change, loss change)\n\n"
            f"| {' | '.join(head)} |\n|{'---|' * len(head)}\n| {' | '.join(cells)} |\n")


def write_recency(result: dict, out: str | Path, title: str = "", name: str = "recency") -> dict[str, Path]:
    """OUT/NAME.json (everything), NAME.md (the table) and NAME.png (the plot)."""
    from eval.results import json_file, text_file, write_files

    paths = {ext: Path(out) / f"{name}.{ext}" for ext in ("json", "md", "png")}
    write_files({paths["json"]: json_file(result),
                 paths["md"]: text_file((f"## {title}\n\n" if title else "") + markdown_table(result)),
                 paths["png"]: lambda p: plot_drop(result, p, title)})
    return paths


def plot_drop(result: dict, path: Path, title: str = "") -> None:
    """Relative accuracy drop and loss increase vs span position (center, fraction of the context)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for size in cfg["sizes"]:
        rows = [r for r in result["spans"] if r["size"] == size]
        x = [r["center"] for r in rows]
        axes[0].plot(x, [100 * r["acc_drop_rel"] for r in rows], "o-", label=size_label(size, cfg["context"]))
        axes[1].plot(x, [r["loss_increase"] for r in rows], "o-", label=size_label(size, cfg["context"]))
    axes[0].set(xlabel="span position (center / context)", ylabel="relative accuracy drop (%)")
    axes[1].set(xlabel="span position (center / context)", ylabel="loss increase (nats)")
    for ax in axes:
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7, title="span")
    fig.suptitle(title or "recency: corrupted context span vs target-window prediction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
