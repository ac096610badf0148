"""`polar eval sweep`: evaluate every (K-th) checkpoint of several runs, resumably, and put baseline and
polarized runs side by side (a combined table, metric-vs-step curves, NIAH accuracy vs length).

Each evaluation runs as `polar eval lm|niah` would and writes its timestamped result files into the step's
eval folder, ``RUN/eval/step-N/`` (so the model card of step N sees them too); beside them the sweep keeps
``sweep-{lm,niah}.json``, the result with the arguments it was computed with. A result with the same
arguments is reused, so an interrupted sweep computes only what is missing, and results outlive the
checkpoints that rotation deletes later.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

from tqdm import tqdm

from eval.options import niah_config, parse_lm_args, parse_niah_args
from pretrain import checkpoint as ckpt

STEP_DIR_RE = re.compile(r"^step-(\d+)$")


def _eval_lm(run: Path, step: int, argv: str) -> dict:
    from eval.harness import run_lm_eval

    args = parse_lm_args(argv)
    args.checkpoint, args.step = str(run), step
    path = run_lm_eval(args)
    if path is None:
        raise RuntimeError(f"lm-eval wrote no result for {run} step {step}: drop --output_path from --lm")
    return json.loads(path.read_text())


def _eval_niah(run: Path, step: int, argv: str) -> dict:
    from eval.results import evaluate_niah

    return evaluate_niah(run, step, niah_config(parse_niah_args(argv)), progress=False)[0]


EVALUATORS = {"lm": _eval_lm, "niah": _eval_niah}


def checkpoint_steps(run: Path, every: int) -> list[int]:
    """Every ``every``-th checkpoint step of ``run`` (oldest first), always including the latest."""
    steps = [int(ckpt.TAG_RE.match(t)[1]) for t in ckpt.list_tags(run / "checkpoints")]
    picked = steps[::every]
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
    """Written to a temporary file and renamed, so an interrupted write never looks finished."""
    path = result_path(run, step, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"args": argv, "result": result}, indent=2) + "\n")
    os.replace(tmp, path)


Score = tuple[float, float | None]  # (value, standard error or None)


def _mean_with_stderr(cells: list[dict], metric: str, samples: int | None) -> Score:
    """Mean accuracy over cells of ``samples`` prompts each; binomial standard error over all the prompts."""
    p = sum(c[metric] for c in cells) / len(cells)
    return p, (p * (1 - p) / (len(cells) * samples)) ** 0.5 if samples else None


def summarize(name: str, result: dict) -> dict[str, Score]:
    """Flat {metric: (value, stderr)}: lm as "task/metric" with lm-eval's standard error, NIAH as overall and
    per-length accuracies with their binomial standard error."""
    if name == "lm":
        out = {}
        for task, metrics in result["results"].items():
            for key, v in metrics.items():
                metric, _, filt = key.partition(",")
                if filt and "_stderr" not in metric and isinstance(v, int | float) and not isinstance(v, bool):
                    err = metrics.get(f"{metric}_stderr,{filt}")
                    out[f"{task}/{metric}"] = (v, err if isinstance(err, int | float) else None)
        return out
    cells, samples = result["cells"], (result.get("config") or {}).get("samples")
    out = {f"niah/{m}": _mean_with_stderr(cells, m, samples) for m in ("exact_match", "rank1")}
    for length in sorted({c["length"] for c in cells}):
        at = [c for c in cells if c["length"] == length]
        for m in ("rank1", "exact_match"):
            out[f"niah/{m}@{length}"] = _mean_with_stderr(at, m, samples)
    return out


def sweep(runs: list[str | Path], every: int = 1, lm: str | None = None, niah: str | None = None,
          out: str | Path | None = None, progress: bool = True, shard: tuple[int, int] | None = None) -> Path | None:
    """Evaluate what is missing, then write the combined table and plots; returns the table's path.
    ``shard=(i, n)`` evaluates only every n-th (run, step, eval) job starting at i and writes no table
    (a SLURM array task, launch/slurm/eval_sweep.sbatch; a final unsharded call combines them)."""
    runs = [Path(r) for r in runs]
    evals = {name: argv for name, argv in (("lm", lm), ("niah", niah)) if argv is not None}
    for name, argv in evals.items():  # a typo or bad value should fail now, not after hours of other evaluations
        if name == "lm":
            parse_lm_args(argv)
        else:
            niah_config(parse_niah_args(argv))
    jobs = []
    for run in runs:
        steps = checkpoint_steps(run, max(1, every))
        if not steps:
            raise FileNotFoundError(f"no checkpoints under {run}/checkpoints: pass run directories of polar train")
        jobs += [(run, step, name) for step in steps for name in evals]
    if shard is not None:
        jobs = jobs[shard[0] :: shard[1]]
    todo = [j for j in jobs if load_result(*j, evals[j[2]]) is None]
    for run, step, name in tqdm(todo, desc="sweep", disable=not progress):
        save_result(run, step, name, evals[name], EVALUATORS[name](run, step, evals[name]))
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
    out.mkdir(parents=True, exist_ok=True)
    flat: dict[tuple[str, int], dict[str, Score]] = {}
    for r in rows:
        flat.setdefault((r["run"], r["step"]), {}).update(summarize(r["eval"], r["result"]))
    metrics = sorted({m for v in flat.values() for m in v})
    with (out / "sweep.csv").open("w", newline="") as f:
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
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_metrics(flat, [m for m in metrics if "@" not in m], out / "sweep_metrics.png")
    niah_rows = [r for r in rows if r["eval"] == "niah"]
    if niah_rows:
        plot_niah(niah_rows, out / "sweep_niah.png")
    return out / "sweep.md"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(flat: dict[tuple[str, int], dict[str, Score]], metrics: list[str], path: Path) -> None:
    """One panel per metric, one line per run, x = training step, error bars of ± one standard error."""
    if not metrics:
        return
    plt = _pyplot()
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


def plot_niah(rows: list[dict], path: Path) -> None:
    """NIAH accuracy vs context length at each run's latest evaluated step (rank 1 solid, exact match dashed),
    with binomial error bars; lengths labelled as --lengths spells them (1k = 1024)."""
    from eval.niah import length_label

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    latest = {}
    for r in rows:
        if r["step"] >= latest.get(r["run"], r)["step"]:
            latest[r["run"]] = r
    for run, r in sorted(latest.items()):
        scores = summarize("niah", r["result"])
        lengths = sorted({c["length"] for c in r["result"]["cells"]})
        for metric, style in (("rank1", "-o"), ("exact_match", "--x")):
            acc, err = zip(*(scores[f"niah/{metric}@{n}"] for n in lengths), strict=True)
            ax.errorbar(lengths, acc, yerr=None if None in err else err, fmt=style, capsize=3,
                        label=f"{run} @ {r['step']} ({metric})")
    chance = rows[0]["result"]["cells"][0]["chance_rank1"]
    ax.axhline(chance, color="grey", lw=0.8, ls=":", label="chance (rank 1)")
    ax.set_xscale("log", base=2)
    all_lengths = sorted({c["length"] for r in latest.values() for c in r["result"]["cells"]})
    ax.set_xticks(all_lengths, [length_label(n) for n in all_lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
