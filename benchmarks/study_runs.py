"""What the study drivers under benchmarks/ share: run `polar` commands (printed first, logged per run), tell a
finished run, score a run's final checkpoint with registered evaluations (resumable per evaluation), and write
mean ± spread over seeds."""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def show(cmd: list[str], env: dict[str, str] | None = None) -> None:
    prefix = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    print(("$ " + prefix + " " if prefix else "$ ") + shlex.join(cmd), flush=True)


def polar(*args: str) -> list[str]:
    return [sys.executable, "-m", "pretrain.cli", *args]


def call(cmd: list[str], log: Path | None = None) -> None:
    """Run ``cmd`` from the repository root (its output appended to ``log`` when given); exit on failure."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    show(cmd, env)
    full_env = {**os.environ, **env}
    if log is None:
        subprocess.run(cmd, check=True, cwd=ROOT, env=full_env)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"exit {rc}: {shlex.join(cmd)} (log: {log})")


def finished(run_dir: Path) -> bool:
    status = run_dir / "status.json"
    return status.is_file() and json.loads(status.read_text()).get("state") == "finished"


def train(config: str, run_dir: Path, overrides: dict, log: Path) -> Path:
    """`polar train CONFIG` into ``run_dir`` with dotted ``overrides`` unless it finished already (an interrupted
    run resumes from its checkpoint, as `polar train` does)."""
    if not finished(run_dir):
        overrides = {**overrides, "run.name": run_dir.name, "run.out_dir": str(run_dir.parent)}
        call(polar("train", config, *[a for k, v in overrides.items() for a in (f"--{k}", str(v))]), log)
        if not finished(run_dir):
            raise SystemExit(f"{run_dir.name} did not finish: see {log}")
    return run_dir


def score(scores_dir: Path, run_dir: Path, evals: dict[str, tuple[str, str]]) -> dict:
    """Each evaluation of ``evals`` (key -> (kind, options as `polar eval KIND` takes them)) on the run's final
    checkpoint, kept in SCORES_DIR/RUN.json (resumable per evaluation); the result files stay in the run's eval
    folder as `polar eval` keeps them."""
    from eval.registry import evaluate, get
    from tokenizer.atomic import write_text

    path = scores_dir / f"{run_dir.name}.json"
    scores = json.loads(path.read_text()) if path.is_file() else {}
    for key, (kind, options) in evals.items():
        if key in scores:
            continue
        show(["polar", "eval", kind, str(run_dir), *shlex.split(options)])
        summary = get(kind).summarize(evaluate(kind, run_dir, None, options))
        scores[key] = {m: list(s) for m, s in summary.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(scores, indent=2) + "\n")
    return scores


def mean_spread(values: list[float]) -> str:
    """mean ± sample standard deviation over seeds (± nothing for one seed)."""
    if not values:
        return ""
    m = statistics.fmean(values)
    return f"{m:.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")
