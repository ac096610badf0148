"""CLI glue for `polar eval lm | niah | sweep`; the option sets of lm and niah are defined once here and
also parse the argument strings `polar eval sweep --lm "..." --niah "..."` receives. Heavy modules
(torch, lm-eval) load inside the handlers so `polar --help` stays instant."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def default_out(checkpoint: str, step: int | None) -> Path:
    """CHECKPOINT/eval[/step-N]: a run directory's or an export's own eval folder."""
    base = Path(checkpoint) / "eval"
    return base / f"step-{step}" if step is not None else base


# -- option sets ------------------------------------------------------------------------------------------
def add_lm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks or groups (built-in or from "
                   "--include-path), e.g. polar_offline or lambada_openai,hellaswag")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1); default all")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    p.add_argument("--max-length", type=int, default=2048, help="context window in tokens (default 2048)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    p.add_argument("--include-path", default=None, help="folder of extra task YAMLs (python -m eval.tasks.generate)")
    p.add_argument("--model-args", default="", help="extra polar model args, e.g. tokenizer=PATH,device=cuda")


def add_niah_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens, k = 1024 (default 1k,2k,4k)")
    p.add_argument("--depths", default="0:100:10", help="needle depths in %%: start:stop:step or a list "
                   "(default 0:100:10)")
    p.add_argument("--samples", type=int, default=4, help="prompts per (length, depth) cell (default 4)")
    p.add_argument("--haystack", default="builtin", help="'builtin' (the embedded Shakespeare corpus) or a text file")
    p.add_argument("--digits", type=int, default=7, help="digits of the magic number (default 7, as RULER)")
    p.add_argument("--distractors", type=int, default=9, help="wrong values ranked against the true one (default 9)")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens run in parallel at a time, "
                   "each chunk continuing from the state the last one left; bounds memory (default 2048)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for keys, values and offsets (default 0)")
    p.add_argument("--needle", default=None, help="needle template with {value} and optionally {key} (default: "
                   "RULER's 'The special magic number for {key} is: {value}.')")
    p.add_argument("--question", default=None, help="question template, optionally with {key}, that the answer "
                   "follows; \\n is a newline (default: RULER's, ending 'The special magic number for {key} is:')")


def _parse(add_options, argv: str, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog)
    add_options(p)
    return p.parse_args(shlex.split(argv))


def parse_lm_args(argv: str) -> argparse.Namespace:
    return _parse(add_lm_options, argv, "polar eval sweep --lm")


def parse_niah_args(argv: str) -> argparse.Namespace:
    return _parse(add_niah_options, argv, "polar eval sweep --niah")


def lm_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of eval.harness.evaluate from parsed lm options."""
    return {"tasks": args.tasks.split(","), "limit": args.limit, "batch_size": args.batch_size,
            "max_length": args.max_length, "include_path": args.include_path, "num_fewshot": args.num_fewshot,
            "model_args": args.model_args}


def niah_config(args: argparse.Namespace):
    from eval.niah import NiahConfig, parse_depths, parse_lengths

    templates = {k: v.replace("\\n", "\n") for k, v in (("needle", args.needle), ("question", args.question)) if v}
    return NiahConfig(lengths=parse_lengths(args.lengths), depths=parse_depths(args.depths), samples=args.samples,
                      haystack=args.haystack, digits=args.digits, distractors=args.distractors,
                      prefill_chunk=args.prefill_chunk, seed=args.seed, **templates)


# -- handlers ---------------------------------------------------------------------------------------------
def run_lm(args: argparse.Namespace) -> int:
    from eval.harness import evaluate, write_results

    res = evaluate(args.checkpoint, step=args.step, **lm_kwargs(args))
    json_path, md_path = write_results(res, Path(args.out) if args.out else default_out(args.checkpoint, args.step))
    print(md_path.read_text(), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


def run_niah_cmd(args: argparse.Namespace) -> int:
    from eval.loading import load_for_eval
    from eval.niah import run_niah, write_niah

    cfg = niah_config(args)  # a bad option fails before the model loads
    model, tok = load_for_eval(args.checkpoint, args.step, args.tokenizer)
    result = run_niah(model, tok, cfg)
    paths = write_niah(result, Path(args.out) if args.out else default_out(args.checkpoint, args.step),
                       title=str(args.checkpoint))
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
    print(f"wrote {table}" if table else f"shard {args.shard} done")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="evaluate checkpoints: lm-eval tasks, needle in a haystack, sweeps over steps",
                        description="Evaluate checkpoints. CHECKPOINT is a run directory (latest checkpoint, or "
                        "--step N), a checkpoint tag folder or an exported folder.")
    evsub = ev.add_subparsers(dest="eval_command", metavar="EVAL", required=True)

    p = evsub.add_parser(
        "lm", help="score a checkpoint on lm-eval tasks",
        description="Run EleutherAI lm-eval-harness tasks on a checkpoint through the `polar` model "
        "(loglikelihood, loglikelihood_rolling, and generate_until with recurrent decoding). Writes lm.json and "
        "an lm.md table to --out. Offline tasks: python -m eval.tasks.generate --out DIR, then --include-path DIR "
        "--tasks polar_offline. See docs/eval.md (also for stock `lm_eval --model hf` on an export).",
    )
    p.add_argument("checkpoint", help="run directory, checkpoint tag folder or exported folder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: latest)")
    add_lm_options(p)
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/eval[/step-N])")
    p.set_defaults(func=run_lm)

    p = evsub.add_parser(
        "niah", help="needle-in-a-haystack retrieval over a length x depth grid",
        description="Plant a RULER-style needle ('The special magic number for KEY is: VALUE.') at each depth of "
        "prose prompts of each length, ask for it, and score greedy exact match and the log-likelihood rank of the "
        "true value among distractors. Runs recurrently, --prefill-chunk tokens at a time (constant memory), so "
        "lengths far beyond training fit. Writes niah.json, niah.csv and a niah.png heatmap to --out.",
    )
    p.add_argument("checkpoint", help="run directory, checkpoint tag folder, exported folder, or any transformers "
                   "causal LM folder or Hub id (Mamba, Mamba-2, GPT-NeoX/Pythia, Llama, ...)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of a run directory (default: latest)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the export's, the run's or the "
                   "model folder's tokenizer.json)")
    add_niah_options(p)
    p.add_argument("--out", default=None, help="output folder (default: CHECKPOINT/eval[/step-N])")
    p.set_defaults(func=run_niah_cmd)

    from eval.recency_cli import add_recency_parser  # polar eval recency (paper Table 1/3)

    add_recency_parser(evsub)

    p = evsub.add_parser(
        "sweep", help="evaluate every (K-th) checkpoint of one or more runs; resumable; tables and plots",
        description="Run `eval lm` and/or `eval niah` on every K-th checkpoint step of each RUN. Each result is "
        "stored as RUN/eval/sweep/step_N/{lm,niah}.json and reused when it exists with the same arguments, so an "
        "interrupted sweep resumes (and a later one adds new checkpoints). Writes sweep.csv, sweep.md, "
        "sweep_metrics.png (metric vs step per run) and sweep_niah.png (NIAH accuracy vs length per run) to --out. "
        "Example: polar eval sweep runs/130m runs/130m-polar --every 2 --niah \"--lengths 1k,4k,16k --samples 8\" "
        "--lm \"--tasks polar_offline --include-path tasks/\"",
    )
    p.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    p.add_argument("--every", type=int, default=1, help="evaluate every K-th checkpoint (the latest always); "
                   "default 1")
    p.add_argument("--lm", default=None, help="options of `polar eval lm` as one quoted string")
    p.add_argument("--niah", default=None, help="options of `polar eval niah` as one quoted string")
    p.add_argument("--out", default=None, help="folder for the combined table and plots (default: RUNS_PARENT/sweep)")
    p.add_argument("--shard", default=None, metavar="I/N", help="evaluate only the I-th of N slices of the jobs "
                   "and write no table (SLURM array tasks; a final call without --shard combines)")
    p.set_defaults(func=run_sweep_cmd)
