"""RULER (``polar eval ruler``): the synthetic long-context tasks of eval/ruler_data.py run greedily on a
model over a task x length x depth grid, scored as RULER scores them.

Scores (RULER's, per sample, then averaged): ``string_match_all`` — the fraction of the reference strings
found in the prediction, case-insensitive (every task here uses it); ``string_match_part`` — 1 when any
reference is found (RULER's QA metric, reported beside it). The prediction is the greedy continuation of the
prompt (RULER's answer prefix included) for the task's ``max_new`` tokens, cut at EOS, stripped, control
characters turned into newlines (RULER's postprocessing). Prompts are prefilled in chunks carrying the
model's state (eval.niah.prefill: flat memory for SSMs), one sample at a time since each has its own length.
Results: JSON (config, cells, samples), CSV (cells), a PNG of per-task heatmaps and a Markdown summary table.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eval.ruler_data import ALL_TASKS, TASKS

_CONTROL = re.compile(r"[\x00-\x1f]")


@dataclass
class RulerConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])
    depths: list[float] = field(default_factory=lambda: [0.0, 25.0, 50.0, 75.0, 100.0])  # percent
    samples: int = 4
    haystack: str = "builtin"  # any dataset spec tokenizer.sources reads
    max_new: int | None = None  # cap on generated tokens (None: each task's RULER budget)
    prefill_chunk: int = 2048
    seed: int = 0

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in ALL_TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"ruler: unknown task(s) {', '.join(unknown) or '(none given)'}: choose from "
                             f"{', '.join(ALL_TASKS)}")
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"ruler: need positive lengths (got {self.lengths})")
        if not self.depths or any(not 0 <= d <= 100 for d in self.depths):
            raise ValueError(f"ruler: need depths in [0, 100] (got {self.depths})")
        if self.samples < 1 or (self.max_new is not None and self.max_new < 1) or self.prefill_chunk < 1:
            raise ValueError(f"ruler: need samples, max_new and prefill_chunk >= 1 (got {self.samples}, "
                             f"{self.max_new}, {self.prefill_chunk})")

    def depths_of(self, task: str) -> list[float | None]:
        """The depths a task is run at: none for the word-extraction tasks (no needle to place)."""
        return list(self.depths) if ALL_TASKS[task].has_depth else [None]


# -- scoring ----------------------------------------------------------------------------------------------
def postprocess(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, refs: list[str]) -> float:
    """The fraction of ``refs`` found in ``prediction`` (case-insensitive)."""
    return sum(r.lower() in prediction.lower() for r in refs) / len(refs)


def string_match_part(prediction: str, refs: list[str]) -> float:
    """1.0 when any of ``refs`` is found in ``prediction`` (case-insensitive)."""
    return float(any(r.lower() in prediction.lower() for r in refs))


# -- running ----------------------------------------------------------------------------------------------
def generate(model, tok, prompt: str, max_new: int, chunk: int) -> str:
    """The greedy continuation of ``prompt``, cut at EOS (eval.niah's chunked prefill and greedy decoding)."""
    import torch

    from eval.niah import greedy, prefill

    device = next(model.parameters()).device
    logits, states = prefill(model, torch.tensor([tok.encode(prompt)], device=device), chunk)
    ids = greedy(model, logits, states, max_new)[0].tolist()
    if tok.eos_id in ids:
        ids = ids[:ids.index(tok.eos_id)]
    return tok.decode(ids)


def check_lengths(tok, hay, cfg: RulerConfig) -> None:
    """Refuse, before any generation, every (task, length) whose instruction, needles and question alone
    overflow the length (one line naming them all), instead of failing at that cell after hours of others."""
    from eval.ruler_data import cell_rng, fixed_tokens

    short = []
    for task in cfg.tasks:
        depth = cfg.depths_of(task)[0]
        for n in cfg.lengths:
            if (needed := fixed_tokens(task, tok, hay, n, depth, cell_rng(cfg.seed, task, n, depth))) > n:
                short.append(f"{task} at {n} (needs {needed})")
    if short:
        raise ValueError(f"{', '.join(short)}: these lengths cannot hold the task's instruction, needles and "
                         "question without any haystack; use longer --lengths or leave those --tasks out")


def run_ruler(model, tok, cfg: RulerConfig, progress: bool = True) -> dict:
    """Every (task, length, depth) cell of ``cfg.samples`` prompts; returns {"config", "cells", "samples"}."""
    from tqdm import tqdm

    from eval.ruler_data import Haystack, cell_rng, make_sample

    hay = Haystack.load(cfg.haystack)
    grid = [(t, n, d) for t in cfg.tasks for n in cfg.lengths for d in cfg.depths_of(t)]
    check_lengths(tok, hay, cfg)
    cells, samples = [], []
    for task, length, depth in tqdm(grid, desc="ruler", disable=not progress):
        rng = cell_rng(cfg.seed, task, length, depth)
        max_new = min(ALL_TASKS[task].max_new, cfg.max_new or ALL_TASKS[task].max_new)
        records = []
        for _ in range(cfg.samples):
            s = make_sample(task, tok, hay, length, depth, rng)
            pred = postprocess(generate(model, tok, s.prompt, max_new, cfg.prefill_chunk))
            records.append({"task": task, "length": length, "depth": depth, "tokens": s.tokens,
                            "outputs": s.outputs, "prediction": pred,
                            "all": string_match_all(pred, s.outputs), "part": string_match_part(pred, s.outputs)})
        samples += records
        cells.append({"task": task, "length": length, "depth": depth, "n": len(records),
                      "all": sum(r["all"] for r in records) / len(records),
                      "part": sum(r["part"] for r in records) / len(records),
                      "tokens": sum(r["tokens"] for r in records) / len(records)})
    return {"config": asdict(cfg), "cells": cells, "samples": samples}


# -- tables and figures -----------------------------------------------------------------------------------
def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def summary_table(result: dict) -> str:
    """Markdown: one row per task, one column per length (string_match_all, mean over depths), and the mean."""
    from eval.niah import length_label

    cells = result["cells"]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    lengths = sorted({c["length"] for c in cells})
    lines = ["| task | " + " | ".join(length_label(n) for n in lengths) + " | mean |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for t in [*tasks, None]:
        row = [mean([c["all"] for c in cells if c["length"] == n and t in (None, c["task"])]) for n in lengths]
        lines.append(f"| {t or '**all tasks**'} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {mean(row):.3f} |")
    return "\n".join(lines) + "\n"


def heatmaps(result: dict, path: Path, title: str = "") -> None:
    """One panel per task: depth rows x length columns of string_match_all (word tasks: one row)."""
    from eval.niah import length_label
    from eval.sweep import pyplot

    plt = pyplot()
    cells = result["cells"]
    tasks = list(dict.fromkeys(c["task"] for c in cells))
    lengths = sorted({c["length"] for c in cells})
    cols = min(4, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1 + cols * (1.8 + 0.9 * len(lengths)), 2.6 * rows), squeeze=False)
    fig.subplots_adjust(wspace=0.5, hspace=0.5)
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    for ax, task in zip(axes.flat, tasks, strict=False):
        depths = list(dict.fromkeys(c["depth"] for c in cells if c["task"] == task))
        grid = [[next(c["all"] for c in cells if (c["task"], c["length"], c["depth"]) == (task, n, d))
                 for n in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), ["-" if d is None else f"{d:g}%" for d in depths])
        ax.set_title(task, fontsize=9)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6)
    facts = f"RULER string_match_all, {result['config']['samples']} samples per cell (rows: depth; columns: length)"
    fig.suptitle(f"{title}: {facts}" if title else facts)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_ruler(result: dict, out: str | Path, title: str = "", name: str = "ruler") -> dict[str, Path]:
    """OUT/NAME.json (everything), NAME.csv (one row per cell), NAME.png (heatmaps), NAME.md (summary)."""
    from eval.results import csv_file, json_file, text_file, write_files

    paths = {ext: Path(out) / f"{name}.{ext}" for ext in ("json", "csv", "png", "md")}
    write_files({paths["json"]: json_file(result), paths["csv"]: csv_file(result["cells"]),
                 paths["png"]: lambda p: heatmaps(result, p, title),
                 paths["md"]: text_file((f"# RULER: {title}\n\n" if title else "") + summary_table(result))})
    return paths
