"""`polar eval sweep`: evaluate every (K-th) checkpoint of several runs, resumably, and put baseline and
polarized runs side by side (a combined table, metric-vs-step curves, each evaluation's own figure).

The evaluations are the registry's (eval/registry.py), each given as `polar eval KIND` takes its options.
Each runs as that command would and writes its timestamped result files into the step's eval folder,
``RUN/eval/step-N/`` (so the model card of step N sees them too); beside them the sweep keeps
``sweep-KIND.json``, the result with the options it was computed with (every file written as every output
is, tokenizer/atomic.py: an interrupted sweep leaves whole results or none). A result with the same options is
reused, so an interrupted sweep computes only what is missing, and results outlive the checkpoints that
rotation deletes later.
"""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

from tqdm import tqdm

from eval.registry import Score, evaluate, get
from pretrain import checkpoint as ckpt

STEP_DIR_RE = re.compile(r"^step-(\d+)$")


def checkpoint_steps(run: Path, every: int, latest_only: bool = False) -> list[int]:
    """Every ``every``-th checkpoint step of ``run`` (oldest first), always including the latest; with
    ``latest_only``, the latest alone."""
    steps = [int(ckpt.TAG_RE.match(t)[1]) for t in ckpt.list_tags(run / "checkpoints")]
    picked = steps[-1:] if latest_only else steps[::every]
    if steps and steps[-1] not in picked:
        picked.append(steps[-1])
    return picked


def result_path(run: Path, step: int, name: str) -> Path:
    return run / "eval" / f"step-{step}" / f"sweep-{name}.json"


def load_result(run: Path, step: int, name: str, argv: str) -> dict | None:
    path = result_path(run, step, name)
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    return stored["result"] if stored.get("args") == argv else None


def save_result(run: Path, step: int, name: str, argv: str, result: dict) -> None:
    from eval.results import write_json

    write_json(result_path(run, step, name), {"args": argv, "result": result})


def sweep(runs: list[str | Path], every: int, evals: dict[str, str], out: str | Path | None = None,
          progress: bool = True, shard: tuple[int, int] | None = None, latest_only: bool = False) -> Path | None:
    """Evaluate what is missing, then write the combined table and plots; returns the table's path.
    ``evals``: evaluation name -> its options as one string. ``shard=(i, n)`` evaluates only every n-th
    (run, step, eval) job starting at i and writes no table (a SLURM array task,
    launch/slurm/eval_sweep.sbatch; a final unsharded call combines them)."""
    runs = [Path(r) for r in runs]
    for name, argv in evals.items():  # a typo or bad value should fail now, not after hours of other evaluations
        get(name).check(shlex.split(argv))
    jobs = []
    for run in runs:
        steps = checkpoint_steps(run, max(1, every), latest_only)
        if not steps:
            raise FileNotFoundError(f"no checkpoints under {run}/checkpoints: pass run directories of polar train")
        jobs += [(run, step, name) for step in steps for name in evals]
    if shard is not None:
        jobs = jobs[shard[0] :: shard[1]]
    todo = [j for j in jobs if load_result(*j, evals[j[2]]) is None]
    for run, step, name in tqdm(todo, desc="sweep", disable=not progress):  # as `polar eval NAME RUN --step STEP`
        save_result(run, step, name, evals[name], evaluate(name, run, step, evals[name]))
    if shard is not None:
        return None
    rows = []
    for run in runs:  # every stored result, including steps whose checkpoints were rotated away
        for path in sorted((run / "eval").glob("step-*/sweep-*.json")):
            name, step = path.stem.removeprefix("sweep-"), int(STEP_DIR_RE.match(path.parent.name)[1])
            if name in evals and (result := load_result(run, step, name, evals[name])) is not None:
                rows.append({"run": run.name, "step": step, "eval": name, "result": result})
    out = Path(out) if out else runs[0].resolve().parent / "sweep"
    return write_tables(rows, out)


def write_tables(rows: list[dict], out: Path) -> Path:
    """sweep.{csv,md}, the metrics' curves and each evaluation's figure, written together (eval.results)."""
    from eval.results import text_file, write_files

    flat: dict[tuple[str, int], dict[str, Score]] = {}
    for r in rows:
        flat.setdefault((r["run"], r["step"]), {}).update(get(r["eval"]).summarize(r["result"]))
    metrics = sorted({m for v in flat.values() for m in v})

    def table(path: Path) -> None:
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["run", "step", *(c for m in metrics for c in (m, f"{m}_stderr"))])
            for (run, step), v in sorted(flat.items()):
                w.writerow([run, step, *(("" if x is None else x) for m in metrics for x in v.get(m, ("", "")))])

    def cell(score: Score | None) -> str:
        if score is None:
            return ""
        return f"{score[0]:.4g}" + ("" if score[1] is None else f" ± {score[1]:.2g}")

    lines = ["| run | step | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for (run, step), v in sorted(flat.items()):
        lines.append(f"| {run} | {step} | " + " | ".join(cell(v.get(m)) for m in metrics) + " |")
    files = {out / "sweep.csv": table, out / "sweep.md": text_file("\n".join(lines) + "\n"),
             out / "sweep_metrics.png": lambda p: plot_metrics(flat, [m for m in metrics if "@" not in m], p)}
    for name in dict.fromkeys(r["eval"] for r in rows):  # each evaluation's own figure, if it draws one
        own = [r for r in rows if r["eval"] == name]
        files[out / f"sweep_{name}.png"] = lambda p, name=name, own=own: get(name).plot(own, p)
    write_files(files)
    return out / "sweep.md"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(flat: dict[tuple[str, int], dict[str, Score]], metrics: list[str], path: Path) -> None:
    """One panel per metric, one line per run, x = training step, error bars of ± one standard error."""
    if not metrics:
        return
    plt = pyplot()
    cols = min(3, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.2 * nrows), squeeze=False)
    runs = sorted({run for run, _ in flat})
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for run in runs:
            pts = sorted((s, *v[metric]) for (r, s), v in flat.items() if r == run and metric in v)
            if pts:
                steps, values, errs = zip(*pts, strict=True)
                yerr = [e or 0.0 for e in errs] if any(e is not None for e in errs) else None
                ax.errorbar(steps, values, yerr=yerr, marker="o", capsize=3, label=run)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step")
        ax.locator_params(axis="x", integer=True)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
