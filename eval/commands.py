"""The eval package's commands: `polar eval KIND` (one subcommand per registered evaluation, eval/registry.py) and
`polar eval sweep`, `polar mqar train|eval`, `polar diagnose` and `polar study depth` — each parser and its thin
handler here, the logic in the module the handler calls. Heavy modules (torch, lm-eval's evaluator) load inside
the handlers so `polar --help` stays instant."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from eval.registry import DOCS, evaluations, get


def _mqar_config(path: str, overrides: list[str]):
    from eval.mqar import load_mqar_config
    from models.typed_config import parse_override_args

    return load_mqar_config(path, parse_override_args(overrides))


def run_mqar_train(args: argparse.Namespace) -> int:
    from eval.mqar import plan, plan_markdown, results_markdown, train_sweep

    cfg = _mqar_config(args.config, args.overrides)
    if args.plan:
        print(plan_markdown(plan(cfg, args.variant, args.layers)), end="")
        return 0
    print(results_markdown(train_sweep(cfg, args.variant, args.layers, args.force)), end="")
    print(f"wrote {cfg.run.dir / 'results.md'} and results.json")
    return 0


def run_mqar_eval(args: argparse.Namespace) -> int:
    from eval.mqar import evaluate, load_cell_model, rescore_sweep, results_markdown, write_scores
    from models.typed_config import ConfigError
    from pretrain.export import eval_folder

    path = Path(args.target)
    if path.is_file():  # a sweep config
        print(results_markdown(rescore_sweep(_mqar_config(args.target, args.overrides))), end="")
        return 0
    cfg = _mqar_config(args.config, args.overrides) if args.config else None
    cell = (path / "model.pt").is_file()
    if cell:  # one sweep cell, scored on its own eval stages unless --config
        model, own = load_cell_model(path)
        cfg = cfg or own
    else:  # anything pretrain.export.load_model accepts
        from eval.mqar import default_device
        from pretrain.export import load_model

        if cfg is None:
            raise ConfigError(f"{path} is not an MQAR cell folder: pass --config CONFIG for the eval stages")
        model = load_model(path, args.step).to(default_device())
    accs = evaluate(model, cfg.data)
    out = write_scores(accs, Path(args.out) if args.out else path if cell else eval_folder(path, args.step), cfg.data)
    for k, v in accs.items():
        print(f"{k:>16}  {100 * v:6.2f}%")
    print(f"wrote {out}")
    return 0


def default_diagnose_out(target: str, step: int | None) -> Path:
    """Like the eval commands: the first target's eval folder (RUN/eval/step-N); runs/diagnose/NAME for a
    config YAML."""
    from pretrain.export import eval_folder

    path = Path(target)
    return Path("runs") / "diagnose" / path.stem if path.is_file() else eval_folder(path, step)


def run_diagnose(args: argparse.Namespace) -> int:
    from eval.diagnostics import diagnose, load_target
    from eval.results import timestamp

    out = Path(args.out) if args.out else default_diagnose_out(args.targets[0], args.step) / f"diagnose_{timestamp()}"
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists: pass --force to replace it or choose another --out")
    names = [Path(t).stem if Path(t).is_file() else Path(t).name for t in args.targets]
    models = {name: load_target(t, args.step, args.trust_pickle) for name, t in zip(names, args.targets)}
    diagnose(models, out, args.batch, args.seq_len, args.seed)
    print(f"wrote recency, oversmoothing and a_range .json/.png to {out}")
    return 0


class _RecordingParser(argparse.ArgumentParser):
    """A subcommand parser that keeps its own tokens as typed (``command_tokens``): a result records its
    settings exactly as given, so the model card can print a command that reproduces it."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        ns.command_tokens = list(args or [])
        return ns, extra


def run_eval(args: argparse.Namespace) -> int:
    from eval.options import option_tokens

    kind = get(args.evaluation)
    result, paths = kind.evaluate(args, option_tokens(args.command_tokens, args.checkpoint))
    if report := kind.report(result):
        print(report)
    if paths:
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from eval.sweep import sweep

    evals = {name: getattr(args, name) for name in evaluations() if getattr(args, name) is not None}
    if not evals:
        raise ValueError("nothing to evaluate: pass " + " and/or ".join(f'--{n} "..."' for n in evaluations()))
    shard = None
    if args.shard:
        i, _, n = args.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
            raise ValueError(f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. 3/8")
        shard = (int(i), int(n))
    table = sweep(args.runs, args.every, evals, out=args.out, shard=shard, latest_only=args.latest)
    if table:
        print(table.read_text(), end="")
    print(f"wrote {table}" if table else f"shard {args.shard} done")
    return 0


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"expected comma-separated integers like 2,4,8, got {text!r}") from None


def _sbatch(script: str, *args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *args], input=script, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed: {out.stderr.strip()}")
    return out.stdout.strip().split(";")[0]


def run_study_cmd(args: argparse.Namespace) -> int:
    from eval.study import combine, expand_grid, grid_table, load_study_config, render_study_sbatch, run_cell, run_study
    from models.typed_config import parse_override_args

    overrides = parse_override_args(args.overrides)
    if args.depths:
        overrides["study.depths"] = _ints(args.depths)
    if args.seq_lens:
        overrides["study.seq_lens"] = _ints(args.seq_lens)
    cfg = load_study_config(args.config, overrides)
    cells = expand_grid(cfg)
    if args.cell is not None:  # one array task: no grid print, no combining
        if not 0 <= args.cell < len(cells):
            raise ValueError(f"--cell {args.cell}: the grid has cells 0..{len(cells) - 1}")
        return 0 if run_cell(cfg, cells[args.cell]) else 1
    if args.combine:
        table = combine(cfg, cells)
        print(table.read_text() if table else "no cell has scores yet", end="")
        return 0
    print(grid_table(cells), end="")
    if args.plan:
        return 0
    if args.slurm:
        flat = [*args.overrides, *(["--study.depths", f"[{args.depths}]"] if args.depths else []),
                *(["--study.seq_lens", f"[{args.seq_lens}]"] if args.seq_lens else [])]
        extra = [f"--{k}={v}" for k, v in (("time", args.time), ("partition", args.partition),
                                           ("account", args.account)) if v]
        extra += [f"--gpus-per-task={args.gpus}"] if args.gpus else []
        array = render_study_sbatch(args.config, flat, cfg.study.dir, False, len(cells), extra)
        final = render_study_sbatch(args.config, flat, cfg.study.dir, True, len(cells), extra)
        if not args.submit:
            print(array, "\n# --- then, after the array (sbatch --dependency=afterany:ARRAY_JOB) ---\n", final, sep="")
            return 0
        (cfg.study.dir / "logs").mkdir(parents=True, exist_ok=True)
        job = _sbatch(array)
        done = _sbatch(final, f"--dependency=afterany:{job}")
        print(f"submitted array job {job} ({len(cells)} cells) and combining job {done}")
        return 0
    failed = run_study(cfg, cells)
    table = cfg.study.dir / "study.md"
    if table.is_file():
        print(table.read_text(), end="")
        print(f"wrote {table}, study.csv, study.json and study.png in {cfg.study.dir}")
    if failed:
        print(f"failed cells (rerun to retry them): {', '.join(failed)}")
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate checkpoints: " + ", ".join(evaluations()) + "; sweeps over steps",
                        description="Evaluate checkpoints. CHECKPOINT is a run directory (latest checkpoint, or "
                        f"--step N), a checkpoint tag folder, an exported folder or a transformers model. See {DOCS}.")
    evsub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True, parser_class=_RecordingParser)
    for name, kind in evaluations().items():
        p = evsub.add_parser(name, help=kind.help, description=kind.description, usage=kind.usage,
                             allow_abbrev=False)
        kind.add_arguments(p)
        p.set_defaults(func=run_eval, evaluation=name)

    p = evsub.add_parser(
        "sweep", help="evaluate every (K-th) checkpoint of one or more runs; resumable; tables and plots",
        description="Run evaluations (one --KIND \"OPTIONS\" each, as `polar eval KIND` takes them) on every K-th "
        "checkpoint of each RUN, results kept in RUN/eval/step-N/ and reused when the options match. Writes "
        f"sweep.{{csv,md}} and plots to --out. See {DOCS}.",
    )
    p.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    p.add_argument("--every", type=int, default=1, help="evaluate every K-th checkpoint (the latest always); "
                   "default 1")
    p.add_argument("--latest", action="store_true", help="evaluate only each run's latest checkpoint (the table "
                   "still shows every result stored before)")
    for name in evaluations():
        p.add_argument(f"--{name}", default=None, metavar="OPTIONS",
                       help=f"options of `polar eval {name}` as one quoted string")
    p.add_argument("--out", default=None, help="folder for the combined table and plots (default: RUNS_PARENT/sweep)")
    p.add_argument("--shard", default=None, metavar="I/N", help="evaluate only the I-th of N slices of the jobs "
                   "and write no table (SLURM array tasks; a final call without --shard combines)")
    p.set_defaults(func=run_sweep_cmd)

    p = sub.add_parser("mqar", help="multi-query associative recall: train and score the paper's Table 2",
                       description="Multi-query associative recall (zoology's multiquery_ar; the paper's Table 2). "
                       "See `polar mqar train --help` and `polar mqar eval --help`.")
    mqar = p.add_subparsers(dest="mqar_command", metavar="SUBCOMMAND", required=True)
    t = mqar.add_parser(
        "train", help="train and score every variant x depth of a sweep config",
        description="Train the MQAR sweep (variants x depths x learning rates, best kept per cell), then write the "
        "paper's "
        "Table 2 as results.{json,md}. Finished cells are skipped; --plan prints the cost. See docs/reproduction.md.",
    )
    t.add_argument("config", help="MQAR sweep YAML, e.g. configs/mqar/cpu.yaml or configs/mqar/paper.yaml")
    t.add_argument("--variant", action="append", help="train only this variant (repeatable)")
    t.add_argument("--layers", type=int, action="append", help="train only this depth (repeatable)")
    t.add_argument("--force", action="store_true", help="retrain cells that already have a result")
    t.add_argument("--plan", action="store_true", help="print each cell's parameters, steps, tokens and FLOPs "
                   "(per epoch and at most) without training")
    t.set_defaults(func=run_mqar_train, accepts_overrides=True)
    e = mqar.add_parser(
        "eval", help="score a trained sweep, one cell, or any checkpoint on MQAR",
        description="Score on MQAR: a sweep CONFIG re-scores every cell and rewrites the table; a cell folder or "
        "any checkpoint "
        "(with --config for the eval stages) keeps mqar_eval_<time>.json beside earlier scorings. See "
        "docs/reproduction.md.",
    )
    e.add_argument("target", help="sweep config YAML, cell folder, run directory or exported folder")
    e.add_argument("--config", default=None, help="MQAR config whose data.eval stages to use")
    e.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: latest)")
    e.add_argument("--out", default=None, help="output folder for mqar_eval_<time>.json (default: the cell folder, "
                   "or the checkpoint's eval folder RUN/eval/step-N)")
    e.set_defaults(func=run_mqar_eval, accepts_overrides=True)

    d = sub.add_parser(
        "diagnose", help="recency, over-smoothing and A-range diagnostics (paper Fig. 1, 5, 6)",
        description="Per-layer recency (influence vs distance), over-smoothing (feature similarity by depth) and "
        "A-range "
        "diagnostics for each TARGET (a config, an MQAR cell, a run, an export or a transformers model), "
        "overlaid in one plot per measure. See docs/reproduction.md.",
    )
    d.add_argument("targets", nargs="+", metavar="TARGET", help="config YAML, MQAR cell, run directory, export, "
                   "transformers folder or Hub id")
    d.add_argument("--out", default=None, help="output folder (default: a new diagnose_<time>/ in the first "
                   "TARGET's eval folder, RUN/eval/step-N, kept beside earlier ones; runs/diagnose/NAME for a "
                   "config YAML)")
    d.add_argument("--force", action="store_true", help="replace an existing --out")
    d.add_argument("--step", type=int, default=None, help="checkpoint step for run directories (default: latest)")
    d.add_argument("--batch", type=int, default=4, help="random sequences averaged over (default 4)")
    d.add_argument("--seq-len", type=int, default=128, help="sequence length (default 128)")
    d.add_argument("--seed", type=int, default=0, help="seed of the inputs and the projection (default 0)")
    d.add_argument("--trust-pickle", action="store_true", help="load TARGETs whose weights are pickles only "
                   "(pytorch_model.bin; can run code when loaded): only for files from an author you trust")
    d.set_defaults(func=run_diagnose)

    st = sub.add_parser("study", help="the paper's studies as sweeps: depth x context length at fixed size (Fig. 4)",
                        description="Sweeps that reproduce the paper's studies. See `polar study depth --help`.")
    kinds = st.add_subparsers(dest="study_command", metavar="STUDY", required=True)
    p = kinds.add_parser(
        "depth", help="train and score a depth x context-length grid at fixed parameter count (Fig. 4)",
        description="The paper's Fig. 4: baseline/polarized x depth x context-length cells at fixed counted "
        "parameters, trained "
        "here or as a SLURM array (--slurm), scored (loss by context, NIAH) and combined into study.{json,csv,md,png}; "
        "finished cells are skipped. See docs/studies.md.",
    )
    p.add_argument("config", help="study config (configs/studies/*.yaml)")
    p.add_argument("--depths", default=None, help="comma-separated layer counts (default: the config's)")
    p.add_argument("--seq-lens", default=None, help="comma-separated training context lengths (default: the config's)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the grid with counted parameters and stop")
    mode.add_argument("--cell", type=int, default=None, metavar="I",
                      help="train and score only cell I (what SLURM array tasks run)")
    mode.add_argument("--combine", action="store_true", help="only write the combined table and plot")
    mode.add_argument("--slurm", action="store_true", help="render the SLURM array + combining job (add --submit)")
    p.add_argument("--submit", action="store_true", help="with --slurm: submit them with sbatch")
    p.add_argument("--time", help="with --slurm: time limit per cell, e.g. 04:00:00")
    p.add_argument("--partition", help="with --slurm: partition")
    p.add_argument("--account", help="with --slurm: account")
    p.add_argument("--gpus", type=int, default=0, help="with --slurm: GPUs per cell (default 0)")
    p.set_defaults(func=run_study_cmd, accepts_overrides=True)
