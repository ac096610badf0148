"""CLI glue for `polar eval KIND` (one subcommand per registered evaluation, eval/registry.py) and
`polar eval sweep` (one ``--KIND "OPTIONS"`` per evaluation). Heavy modules (torch, lm-eval's evaluator) load
inside the handlers so `polar --help` stays instant."""

from __future__ import annotations

import argparse

from eval.registry import DOCS, evaluations, get


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
    table = sweep(args.runs, args.every, evals, out=args.out, shard=shard)
    if table:
        print(table.read_text(), end="")
    print(f"wrote {table}" if table else f"shard {args.shard} done")
    return 0


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
    for name in evaluations():
        p.add_argument(f"--{name}", default=None, metavar="OPTIONS",
                       help=f"options of `polar eval {name}` as one quoted string")
    p.add_argument("--out", default=None, help="folder for the combined table and plots (default: RUNS_PARENT/sweep)")
    p.add_argument("--shard", default=None, metavar="I/N", help="evaluate only the I-th of N slices of the jobs "
                   "and write no table (SLURM array tasks; a final call without --shard combines)")
    p.set_defaults(func=run_sweep_cmd)
