"""CLI glue for `polar eval lm | niah | sweep` (option sets in eval/options.py). Heavy modules (torch,
lm-eval's evaluator) load inside the handlers so `polar --help` stays instant."""

from __future__ import annotations

import argparse

from eval.options import add_lm_options, add_niah_options, add_target_arguments, niah_config


def run_lm(args: argparse.Namespace) -> int:
    from eval.harness import run_lm_eval

    path = run_lm_eval(args)
    if path is not None:
        print(f"wrote {path}")
    return 0


def run_niah_cmd(args: argparse.Namespace) -> int:
    from eval.results import evaluate_niah

    cfg = niah_config(args)  # a bad option fails before the model loads
    result, paths = evaluate_niah(args.checkpoint, args.step, cfg, args.tokenizer, args.out)
    for c in result["cells"]:
        print(f"length {c['length']:>7}  depth {c['depth']:>5g}%  exact {c['exact_match']:.2f}  "
              f"rank-1 {c['rank1']:.2f} (chance {c['chance_rank1']:.2f})")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def run_sweep_cmd(args: argparse.Namespace) -> int:
    from eval.sweep import sweep

    if not args.lm and not args.niah:
        raise ValueError("nothing to evaluate: pass --lm \"...\" and/or --niah \"...\"")
    shard = None
    if args.shard:
        i, _, n = args.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
            raise ValueError(f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. 3/8")
        shard = (int(i), int(n))
    table = sweep(args.runs, args.every, lm=args.lm, niah=args.niah, out=args.out, shard=shard)
    if table:
        print(table.read_text(), end="")
    print(f"wrote {table}" if table else f"shard {args.shard} done")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate checkpoints: lm-eval tasks, needle in a haystack, sweeps over steps",
                        description="Evaluate checkpoints. CHECKPOINT is a run directory (latest checkpoint, or "
                        "--step N), a checkpoint tag folder or an exported folder.")
    evsub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    p = evsub.add_parser(
        "lm", help="lm-eval-harness with the `polar` model registered (lm_eval's own flags)",
        usage="polar eval lm [CHECKPOINT] [--step N] --tasks TASKS [lm_eval run flags ...]",
        description="`lm_eval run` with the `polar` model registered: every flag is lm-eval's own and means "
        "what it means there (--model_args, --tasks, --include_path, --output_path, --batch_size, --device, "
        "--limit, --log_samples, --use_cache, --gen_kwargs ...). --model defaults to polar; CHECKPOINT (a run "
        "directory, checkpoint tag folder or export) and --step fill --model_args pretrained=...,step=N; "
        "--output_path defaults to RUN/eval/step-N/lm.json, so results land in lm_<timestamp>.json beside "
        "earlier ones (never overwritten), with the checkpoint step, the configuration, task versions, limit "
        "and time. Offline tasks: python -m eval.tasks.generate --out DIR, then --include_path DIR --tasks "
        "polar_offline. See docs/eval.md (also for stock --model hf on an export).",
    )
    add_lm_options(p)
    p.set_defaults(func=run_lm)

    p = evsub.add_parser(
        "niah", help="needle-in-a-haystack retrieval over a length x depth grid",
        description="Plant a RULER-style needle ('The special magic number for KEY is: VALUE.') at each depth of "
        "prose prompts of each length, ask for it, and score greedy exact match and the log-likelihood rank of the "
        "true value among distractors. Runs recurrently, --prefill-chunk tokens at a time (constant memory), so "
        "lengths far beyond training fit. Writes niah_<timestamp>.{json,csv,png} (a heatmap) to --out; earlier "
        "results are kept.",
    )
    add_target_arguments(p)
    add_niah_options(p)
    p.add_argument("--out", default=None, help="output folder (default: RUN/eval/step-N, or EXPORT/eval)")
    p.set_defaults(func=run_niah_cmd)

    from eval.recency_cli import add_recency_parser  # polar eval recency (paper Table 1/3)

    add_recency_parser(evsub)

    p = evsub.add_parser(
        "sweep", help="evaluate every (K-th) checkpoint of one or more runs; resumable; tables and plots",
        description="Run `eval lm` and/or `eval niah` on every K-th checkpoint step of each RUN. Each result is "
        "written to RUN/eval/step-N/ as `polar eval lm|niah` write it, and indexed with its arguments in "
        "RUN/eval/step-N/sweep-{lm,niah}.json, reused when the arguments match, so an "
        "interrupted sweep resumes (and a later one adds new checkpoints). Writes sweep.csv, sweep.md, "
        "sweep_metrics.png (metric vs step per run) and sweep_niah.png (NIAH accuracy vs length per run) to --out. "
        "Example: polar eval sweep runs/130m runs/130m-polar --every 2 --niah \"--lengths 1k,4k,16k --samples 8\" "
        "--lm \"--tasks polar_offline --include_path tasks/\"",
    )
    p.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    p.add_argument("--every", type=int, default=1, help="evaluate every K-th checkpoint (the latest always); "
                   "default 1")
    p.add_argument("--lm", default=None, help="options of `polar eval lm` (lm-eval's flags) as one quoted string")
    p.add_argument("--niah", default=None, help="options of `polar eval niah` as one quoted string")
    p.add_argument("--out", default=None, help="folder for the combined table and plots (default: RUNS_PARENT/sweep)")
    p.add_argument("--shard", default=None, metavar="I/N", help="evaluate only the I-th of N slices of the jobs "
                   "and write no table (SLURM array tasks; a final call without --shard combines)")
    p.set_defaults(func=run_sweep_cmd)
