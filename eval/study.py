"""The depth x context-length study (``polar study depth``; Wang et al. 2025, Fig. 4) as a resumable sweep.

Fig. 4 pretrains Mamba models of (roughly) one parameter count at several depths and training context
lengths: deeper models gain more as the context grows, up to a point. Here a base training recipe
expands into a grid of cells, variant (baseline / polarized) x depth x training context length. Each
depth gets the d_model whose *counted* parameters (the model built on the meta device) are closest to
the base recipe's, within ``study.param_tolerance``; tokens per optimizer step stay fixed across context
lengths (the global batch in sequences scales inversely). The grid is printed before anything runs.

A cell is trained by ``polar train`` in its own process (so a crash is that cell's alone) into
``STUDY/runs/CELL``; a failed or interrupted cell is reported and retried (``study.retries``), resuming
from its latest checkpoint as ``polar train`` always does. Then its final checkpoint is scored: held-out
loss (the data's val split) at each ``eval.context_lengths`` and every evaluation of ``eval.evals`` (kind ->
options, as `polar eval KIND` takes them, e.g. ``niah: "--lengths 1k,4k"``; eval/registry.py), whose headline
scores become columns; the scores go to ``STUDY/cells/CELL.json``. Re-running skips cells whose
scores exist. Locally the cells run one after another; ``--slurm`` runs them as one SLURM job array
(launch/slurm/study.sbatch, one task per cell) plus a dependent job that combines. The combined
``study.json``/``study.csv``/``study.md`` and ``study.png`` (metric vs depth, one line per training
context length, baseline and polarized side by side) are written whenever any cell has scores.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eval.results import json_file, text_file, write_files, write_json
from launch.render import fill_sbatch
from models.typed_config import ConfigError, apply_overrides, from_dict, load_yaml

DEFAULT_VARIANTS = {"baseline": {"polarize.ones": 0, "polarize.zeros": 0},
                    "polarized": {"polarize.ones": 1, "polarize.zeros": 1}}


@dataclass
class StudySpec:
    name: str = "depth"
    out_dir: str = "runs/studies"
    base: str = ""  # the training recipe every cell starts from (configs/*.yaml)
    depths: list[int] = field(default_factory=lambda: [2, 4, 8])
    seq_lens: list[int] = field(default_factory=lambda: [1024])  # training context lengths
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(DEFAULT_VARIANTS))  # dotted model keys
    param_tolerance: float = 0.05  # |counted / target - 1| allowed for every cell
    retries: int = 1  # extra attempts for a failed cell (each resumes from its latest checkpoint)
    nproc: int = 1  # training processes per cell (torchrun when > 1)

    def __post_init__(self):
        if not self.base:
            raise ValueError("study.base: name the training recipe every cell starts from, e.g. configs/demo-cpu.yaml")
        if not self.depths or any(d < 1 for d in self.depths) or not self.seq_lens or any(s < 2 for s in self.seq_lens):
            raise ValueError(f"study: need depths >= 1 and seq_lens >= 2 (got {self.depths}, {self.seq_lens})")
        if not self.variants or not 0 < self.param_tolerance < 1 or self.retries < 0 or self.nproc < 1:
            raise ValueError("study: need at least one variant, 0 < param_tolerance < 1, retries >= 0, nproc >= 1")

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / self.name


@dataclass
class StudyEvalConfig:
    context_lengths: list[int] = field(default_factory=lambda: [2048])  # held-out loss at each (and every seq_len)
    windows: int = 16  # held-out windows per length
    batch_size: int = 8
    evals: dict[str, str] = field(default_factory=dict)  # evaluation kind -> its options as one string
    seed: int = 0

    def __post_init__(self):  # a typo should fail before hours of training, not after
        from eval.registry import get

        for kind, options in self.evals.items():
            get(kind).check(shlex.split(options))


@dataclass
class StudyConfig:
    study: StudySpec = field(default_factory=StudySpec)
    train: dict[str, Any] = field(default_factory=dict)  # overrides of the base recipe for every cell (nested)
    eval: StudyEvalConfig = field(default_factory=StudyEvalConfig)


def load_study_config(path: str | Path, overrides: dict[str, Any] | None = None) -> StudyConfig:
    return from_dict(StudyConfig, apply_overrides(load_yaml(path), overrides or {}))


@dataclass
class Cell:
    name: str
    variant: str
    depth: int
    seq_len: int
    d_model: int
    params: int
    target_params: int
    overrides: dict[str, Any]  # dotted overrides of the base recipe

    @property
    def deviation(self) -> float:
        return self.params / self.target_params - 1


# -- grid -------------------------------------------------------------------------------------------------
def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def count_params(model_cfg) -> int:
    """Unique parameters of the model a config builds (on the meta device: nothing is allocated)."""
    from models.build import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    return sum(p.numel() for p in model.parameters())


def _model_config(base: dict[str, Any], overrides: dict[str, Any]):
    from pretrain.config import build_config

    return build_config(base, overrides).model


def match_d_model(base: dict[str, Any], overrides: dict[str, Any], target: int) -> tuple[int, int]:
    """(d_model, counted params) closest to ``target`` params, d_model on the model's grid (a multiple of 8;
    for the Transformer also of 2 x n_head). Walks from the base width towards the target (parameters grow
    with d_model), so depths near the base's cost a few model builds."""
    cfg = _model_config(base, overrides)
    step = cfg.d_model_multiple

    def params(d: int) -> int:
        return count_params(_model_config(base, {**overrides, "model.d_model": d}))

    d = max(step, cfg.d_model // step * step)
    p = params(d)
    direction = step if p < target else -step
    while step <= d + direction <= 65536:
        q = params(d + direction)
        if (q >= target) if direction > 0 else (q <= target):  # crossed: the nearer of the two
            return (d + direction, q) if abs(q - target) < abs(p - target) else (d, p)
        d, p = d + direction, q
    return d, p


def expand_grid(cfg: StudyConfig) -> list[Cell]:
    """Every (variant, depth, seq_len) cell with its d_model, counted params and base-recipe overrides."""
    from pretrain.config import build_config

    spec = cfg.study
    base = load_yaml(spec.base)
    common = _flatten(cfg.train)
    base_cfg = build_config(base, common)
    target = count_params(base_cfg.model)
    tokens_per_step = base_cfg.data.global_batch_size * base_cfg.data.seq_len
    cells = []
    for variant, model_overrides in spec.variants.items():
        for depth in spec.depths:
            over = {**common, **{f"model.{k}": v for k, v in model_overrides.items()}, "model.n_layer": depth}
            d_model, params = match_d_model(base, over, target)
            for seq_len in spec.seq_lens:
                if tokens_per_step % seq_len:
                    raise ConfigError(f"study: seq_len {seq_len} does not divide the base recipe's {tokens_per_step} "
                                      "tokens per step: choose seq_lens that do, or change data.global_batch_size")
                global_batch = tokens_per_step // seq_len
                micro = min(base_cfg.data.micro_batch_size, global_batch)
                name = f"{variant}-L{depth}-s{seq_len}"
                cells.append(Cell(name, variant, depth, seq_len, d_model, params, target, {
                    **over, "model.d_model": d_model, "data.seq_len": seq_len,
                    "data.global_batch_size": global_batch, "data.micro_batch_size": micro,
                    "run.name": name, "run.out_dir": str(spec.dir / "runs"),
                }))
    bad = [c for c in cells if abs(c.deviation) > spec.param_tolerance]
    if bad:
        raise ConfigError(f"study: {bad[0].name} has {bad[0].params:,} parameters, {100 * bad[0].deviation:+.1f}% "
                          f"from the target {target:,} (tolerance {100 * spec.param_tolerance:g}%): widen "
                          "study.param_tolerance or choose other depths")
    for c in cells:  # every cell must be a valid recipe before anything runs
        build_config(base, c.overrides)
    return cells


def grid_table(cells: list[Cell]) -> str:
    lines = [f"{'#':>3}  {'cell':<24} {'depth':>5} {'d_model':>7} {'seq_len':>7} {'params':>12} {'vs target':>9}"]
    for i, c in enumerate(cells):
        lines.append(f"{i:>3}  {c.name:<24} {c.depth:>5} {c.d_model:>7} {c.seq_len:>7} {c.params:>12,} "
                     f"{100 * c.deviation:>+8.2f}%")
    return "\n".join(lines) + f"\ntarget {cells[0].target_params:,} parameters (the base recipe's model)\n"


# -- one cell ---------------------------------------------------------------------------------------------
def cell_run_dir(cfg: StudyConfig, cell: Cell) -> Path:
    return cfg.study.dir / "runs" / cell.name


def cell_result_path(cfg: StudyConfig, cell: Cell) -> Path:
    return cfg.study.dir / "cells" / f"{cell.name}.json"


def train_command(cfg: StudyConfig, cell: Cell) -> list[str]:
    args = [a for k, v in cell.overrides.items() for a in (f"--{k}", v if isinstance(v, str) else json.dumps(v))]
    launcher = [sys.executable] if cfg.study.nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.study.nproc}"]
    return [*launcher, "-m", "pretrain.cli", "train", cfg.study.base, *args]


def _finished(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("state") == "finished"


def train_cell(cfg: StudyConfig, cell: Cell, log=print) -> bool:
    """Train (or resume) until finished, retrying up to study.retries times; False when it never finished."""
    run_dir = cell_run_dir(cfg, cell)
    log_file = cfg.study.dir / "logs" / f"{cell.name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(cfg.study.retries + 1):
        if _finished(run_dir):
            return True
        if attempt:
            log(f"  {cell.name}: retry {attempt}/{cfg.study.retries} (resumes from its latest checkpoint)")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with log_file.open("a") as f:
            rc = subprocess.call(train_command(cfg, cell), stdout=f, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            log(f"  {cell.name}: training exited {rc} (log: {log_file})")
    return _finished(run_dir)


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, tokens: np.ndarray, length: int, windows: int, batch_size: int,
                 seed: int) -> float:
    """Mean next-token loss over seeded random held-out windows of ``length`` tokens."""
    import torch.nn.functional as F

    if len(tokens) < length + 1:
        raise ValueError(f"study: the held-out split has {len(tokens)} tokens, fewer than one window of {length}")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - length, windows)
    ids = torch.from_numpy(np.stack([tokens[s:s + length + 1] for s in starts]))
    device = next(model.parameters()).device
    losses = []
    for i in range(0, windows, batch_size):
        batch = ids[i:i + batch_size].to(device)
        logits = model(batch[:, :-1]).logits.float()
        losses.append(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none").mean(1).cpu())
    return float(torch.cat(losses).mean())


def evaluate_cell(cfg: StudyConfig, cell: Cell) -> dict[str, Any]:
    """Held-out loss at every eval context length and the scores of ``eval.evals`` ("scores": name ->
    [value, stderr]) of the final checkpoint."""
    from eval.loading import load_for_eval
    from eval.recency import held_out_tokens
    from pretrain.config import build_config

    run_dir = cell_run_dir(cfg, cell)
    model, tok = load_for_eval(run_dir)
    data = build_config(load_yaml(cfg.study.base), cell.overrides).data.path
    tokens = held_out_tokens(str(data), tok)
    e = cfg.eval
    result: dict[str, Any] = {
        "cell": cell.name, "variant": cell.variant, "depth": cell.depth, "seq_len": cell.seq_len,
        "d_model": cell.d_model, "params": cell.params,
        "loss": {str(n): heldout_loss(model, tokens, n, e.windows, e.batch_size, e.seed)
                 for n in sorted({*e.context_lengths, *cfg.study.seq_lens})},
    }
    for kind, options in e.evals.items():  # kept in the cell run's eval folder, as `polar eval KIND` keeps them
        from eval.registry import evaluate, get

        scores = get(kind).summarize(evaluate(kind, run_dir, None, options))
        result.setdefault("scores", {}).update({m: list(v) for m, v in scores.items()})
    return result


def run_cell(cfg: StudyConfig, cell: Cell, log=print) -> bool:
    """Train and score one cell unless its scores exist; False (reported, not raised) when it failed."""
    out = cell_result_path(cfg, cell)
    if out.is_file():
        log(f"  {cell.name}: done (scores in {out})")
        return True
    log(f"  {cell.name}: training (depth {cell.depth}, d_model {cell.d_model}, seq_len {cell.seq_len})")
    if not train_cell(cfg, cell, log):
        log(f"  {cell.name}: FAILED after {cfg.study.retries + 1} attempt(s); rerun the study to retry it")
        return False
    result = evaluate_cell(cfg, cell)
    write_json(out, result)  # written once, never replaced: a rerun skips the cell
    log(f"  {cell.name}: " + ", ".join(f"loss@{n} {v:.3f}" for n, v in result["loss"].items()))
    return True


# -- the study --------------------------------------------------------------------------------------------
def run_study(cfg: StudyConfig, cells: list[Cell], log=print) -> list[str]:
    """Every cell in turn (failures do not stop the others), then the combined outputs; returns failed cells."""
    failed = [c.name for c in cells if not run_cell(cfg, c, log)]
    combine(cfg, cells)
    return failed


def combine(cfg: StudyConfig, cells: list[Cell]) -> Path | None:
    """study.{json,csv,md,png} from every cell with scores; None when there are none yet."""
    results = [json.loads(p.read_text()) for c in cells if (p := cell_result_path(cfg, c)).is_file()]
    if not results:
        return None
    out = cfg.study.dir
    missing = [c.name for c in cells if not cell_result_path(cfg, c).is_file()]
    lengths = list(results[0]["loss"])
    scores = headline_scores(results)
    head = ["variant", "depth", "d_model", "params", "seq_len", *[f"loss@{n}" for n in lengths], *scores]
    rows = [[r["variant"], r["depth"], r["d_model"], r["params"], r["seq_len"],
             *[f"{r['loss'][n]:.4f}" for n in lengths],
             *[f"{r['scores'][m][0]:.4g}" if m in r.get("scores", {}) else "" for m in scores]]
            for r in sorted(results, key=lambda r: (r["variant"], r["seq_len"], r["depth"]))]
    md = [f"| {' | '.join(head)} |", f"|{'---|' * len(head)}", *[f"| {' | '.join(map(str, r))} |" for r in rows]]
    if missing:
        md.append(f"\nmissing (failed or not yet run): {', '.join(missing)}")

    def table(path: Path) -> None:
        with path.open("w", newline="") as f:
            csv.writer(f).writerows([head, *rows])

    write_files({out / "study.json": json_file({"cells": results, "missing": missing}), out / "study.csv": table,
                 out / "study.md": text_file("\n".join(md) + "\n"),
                 out / "study.png": lambda p: plot_study(results, p, cfg.study.name)})
    return out / "study.md"


def headline_scores(results: list[dict]) -> list[str]:
    """The evaluations' headline scores (names without "@") that any cell has, in a stable order."""
    return sorted({m for r in results for m in r.get("scores", {}) if "@" not in m})


def plot_study(results: list[dict], path: Path, title: str) -> None:
    """Fig. 4's view: metric vs depth, one line per training context length; one column per variant.
    Rows: held-out loss at the cell's own training length, then each evaluation's headline scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in results))
    metrics = [("loss", "held-out loss at the training length"), *((m, m) for m in headline_scores(results))]
    fig, axes = plt.subplots(len(metrics), len(variants), figsize=(4.2 * len(variants), 3.2 * len(metrics)),
                             squeeze=False, sharey="row")
    for col, variant in enumerate(variants):
        for row, (key, label) in enumerate(metrics):
            ax = axes[row][col]
            for seq_len in sorted({r["seq_len"] for r in results}):
                pts = sorted((r["depth"], r["loss"].get(str(seq_len), math.nan) if key == "loss"
                              else r.get("scores", {}).get(key, [math.nan])[0])
                             for r in results if r["variant"] == variant and r["seq_len"] == seq_len)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"context {seq_len}")
            ax.set(xlabel="depth (layers)", ylabel=label, title=variant if row == 0 else None)
            ax.locator_params(axis="x", integer=True)
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: depth at fixed parameter count")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STUDY_TEMPLATE = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "study.sbatch"


def render_study_sbatch(config: str, overrides: list[str], out_dir: Path, combine: bool, cells: int,
                        extra: list[str]) -> str:
    """study.sbatch with this study's variables and #SBATCH directives (array or combining job) filled in."""
    directives = [f"--output={out_dir.resolve()}/logs/slurm-%A_%a.out"]
    directives += [f"--array=0-{cells - 1}"] if not combine else ["--job-name=polar-study-combine"]
    directives += extra
    env = {"STUDY_CONFIG": str(Path(config).resolve()), "POLAR_OVERRIDES": " ".join(overrides),
           "POLAR_PYTHON": sys.executable, **({"COMBINE": "1"} if combine else {})}
    return fill_sbatch(STUDY_TEMPLATE, directives, env)
