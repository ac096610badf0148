"""Continue vs polarize at CPU scale (issue 27, item 3): the natural experiment for ``model.init_from``.

From one trained baseline Mamba (the source: the demo recipe with no polar channels, trained here first unless
``--source RUN`` names one), continue for the same steps on the same batches

- (a) ``continued``: unchanged;
- (b) ``polarized``: 1 ones + 1 zeros state channel added so that the step-0 logits are the source's
  (models/polarize.py), then trained like (a).

``--seeds`` repeats both arms (run.seed: another data order and other initial values of the new channels' B
rows). The source and every arm are scored with the validation loss (``polar eval documents``: packed windows of
the val split), the recency probe and NIAH at the training length. Data: ``builtin:shakespeare`` with a 4,096-piece
tokenizer, as ``make demo`` prepares it (or ``--data``/``--tokenizer``). Resumable (every finished run and every
score is kept); writes ``OUT/study.json`` and ``OUT/study.md`` (mean ± spread over seeds, and each arm minus the
source) and prints every command.

Run (one process, one thread):
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_continue_polarize.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_runs  # noqa: E402
from study_runs import call, mean_spread, polar  # noqa: E402

from tokenizer.atomic import write_text  # noqa: E402

CONFIG = "configs/studies/continue-polarize-cpu.yaml"
OUT = "runs/studies/continue-polarize"
SOURCE_STEPS = 200  # the demo recipe's length
ARMS = {"continued": {"model.polarize.ones": 0, "model.polarize.zeros": 0},
        "polarized": {"model.polarize.ones": 1, "model.polarize.zeros": 1}}
# key -> (evaluation kind, options of `polar eval KIND RUN OPTIONS`): cheap settings for a 128-token model
EVALS = {
    "documents": ("documents", ""),
    "recency": ("recency", "--context 128 --target 16 --sizes 16/128 --positions 3 --windows 64 --batch-size 16"),
    "niah": ("niah", "--lengths 128 --depths 0,50,100 --samples 8 --digits 1 --distractors 8 --needle '#{value}.' "
                     "--question '\\n#'"),
}
# headline columns: (label, key of EVALS, score name)
COLUMNS = [("val loss (packed windows)", "documents", "documents/packed"),
           ("recency: leading span", "recency", "recency/first_loss_increase"),
           ("recency: trailing span", "recency", "recency/last_loss_increase"),
           ("NIAH rank-1", "niah", "niah/rank1")]


def prepare(out: Path, args) -> tuple[str, str]:
    """(data folder, tokenizer) to train on: the given ones, or the demo's data prepared under OUT."""
    if args.data and args.tokenizer:
        return args.data, args.tokenizer
    tok, data = out / "tokenizer", out / "data"
    if not (tok / "polar_tokenizer.json").is_file():
        call(polar("tokenizer", "train", "--dataset", "builtin:shakespeare", "--vocab-size", "4096", "--out", str(tok),
                   "--force"))
    if not (data / "manifest.json").is_file():
        call(polar("prepare", "--dataset", "builtin:shakespeare", "--tokenizer", str(tok), "--out", str(data),
                   "--force"))
    return str(data), str(tok)


def value(scores: dict, key: str, metric: str) -> float | None:
    s = scores.get(key, {}).get(metric)
    return None if s is None else s[0]


def table(source: dict, rows: list[dict]) -> str:
    """One line for the source, one per arm (mean ± spread over seeds), then each arm minus the source."""
    head = ["model", "runs", *[c[0] for c in COLUMNS]]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head),
             f"| source ({SOURCE_STEPS} steps, baseline) | 1 | "
             + " | ".join(mean_spread([v] if (v := value(source, k, m)) is not None else []) for _, k, m in COLUMNS)
             + " |"]
    diffs = []
    for arm in ARMS:
        rs = [r["scores"] for r in rows if r["arm"] == arm]
        cols = [[v for r in rs if (v := value(r, k, m)) is not None] for _, k, m in COLUMNS]
        lines.append(f"| {arm} | {len(rs)} | {' | '.join(mean_spread(c) for c in cols)} |")
        base = [value(source, k, m) for _, k, m in COLUMNS]
        diffs.append(f"| {arm} − source | {len(rs)} | " + " | ".join(
            f"{statistics.fmean(c) - b:+.4f}" if c and b is not None else "" for c, b in zip(cols, base)) + " |")
    return "\n".join([*lines, *diffs]) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG, help=f"the recipe of the source and of both arms (default {CONFIG})")
    p.add_argument("--out", default=OUT, help=f"data, runs and scores (default {OUT})")
    p.add_argument("--source", help="a trained baseline run to continue (default: train one here, "
                   f"{SOURCE_STEPS} steps of the recipe at peak LR 3e-3)")
    p.add_argument("--data", help="a prepared data folder (with --tokenizer; default: builtin:shakespeare under OUT)")
    p.add_argument("--tokenizer", help="the data's tokenizer")
    p.add_argument("--seeds", default="1", help="run.seed of each repetition of both arms (default 1)")
    p.add_argument("--steps", type=int, default=100, help="continuation steps per arm (default 100)")
    args = p.parse_args(argv)
    out, seeds = Path(args.out), [int(s) for s in args.seeds.split(",")]
    data, tok = prepare(out, args)
    common = {"data.path": data, "data.tokenizer": tok}
    source = Path(args.source) if args.source else study_runs.train(
        args.config, out / "runs" / "source", {**common, **ARMS["continued"], "schedule.steps": SOURCE_STEPS,
                                               "schedule.warmup_steps": 20, "optim.lr": 3e-3},
        out / "logs" / "source.log")
    source_scores = study_runs.score(out / "scores", source, EVALS)
    rows = []
    for seed in seeds:
        for arm, overrides in ARMS.items():
            name = f"{arm}-s{seed}"
            run = study_runs.train(args.config, out / "runs" / name,
                                   {**common, **overrides, "run.seed": seed, "model.init_from": str(source),
                                    "schedule.steps": args.steps}, out / "logs" / f"{name}.log")
            rows.append({"arm": arm, "seed": seed, "scores": study_runs.score(out / "scores", run, EVALS)})
            md = table(source_scores, rows)
            print(md, flush=True)
    write_text(out / "study.json", json.dumps({"evals": EVALS, "source": {"run": str(source),
                                                                          "scores": source_scores},
                                               "runs": rows}, indent=2) + "\n")
    write_text(out / "study.md", md)
    print(f"wrote {out / 'study.json'} and {out / 'study.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
