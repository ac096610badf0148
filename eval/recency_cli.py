"""CLI glue for `polar eval recency` (registered by eval.cli); heavy modules load inside the handler."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.options import add_target_arguments


def default_data(checkpoint: str, step: int | None) -> str:
    """The run's own prepared data (its val split) when the checkpoint is a run of ours, else 'builtin'."""
    from pretrain import checkpoint as ckpt
    from pretrain.export import checkpoint_location

    loc = checkpoint_location(checkpoint, step) if Path(checkpoint).exists() else None
    data = loc and ckpt.read_state(*loc)["config"]["data"].get("path")
    return data if data and (Path(data) / "manifest.json").is_file() else "builtin"


def run_recency_cmd(args: argparse.Namespace) -> int:
    from eval.loading import load_for_eval
    from eval.recency import RecencyConfig, held_out_tokens, parse_fraction, run_recency, write_recency
    from pretrain.export import eval_folder

    cfg = RecencyConfig(context=args.context, target=args.target, positions=args.positions, windows=args.windows,
                        batch_size=args.batch_size, seed=args.seed,
                        sizes=[parse_fraction(s) for s in args.sizes.split(",")])  # bad options fail before loading
    model, tok = load_for_eval(args.checkpoint, args.step, args.tokenizer)
    data = args.data or default_data(args.checkpoint, args.step)
    vocab = min(tok.vocab_size, model.config.vocab_size)  # random tokens both the tokenizer and the model know
    result = run_recency(model, held_out_tokens(data, tok), vocab, cfg)
    result["target"], result["data"] = str(args.checkpoint), data
    paths = write_recency(result, Path(args.out) if args.out else eval_folder(args.checkpoint, args.step),
                          title=str(args.checkpoint))
    print(paths["md"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def add_recency_parser(evsub: argparse._SubParsersAction) -> None:
    p = evsub.add_parser(
        "recency", help="robustness to a corrupted context span: leading vs middle vs trailing (paper Table 1/3)",
        description="The paper's Table 1/3 experiment for language models: on held-out windows of --context "
        "tokens, replace a span (each --sizes fraction of the context, at --positions starts from leading to "
        "trailing) with random tokens and measure next-token loss and top-1 accuracy on the --target tokens "
        "after the context, against the clean windows. Deterministic given --seed. Writes recency.json, a "
        "Table-1-like recency.md and recency.png (drop vs span position) to --out. Example: polar eval recency "
        "runs/demo-cpu --context 96 --target 32",
    )
    add_target_arguments(p)
    p.add_argument("--data", default=None, help="held-out tokens: a prepared data folder (its val split), 'builtin' "
                   "(the builtin corpus's held-out documents) or a text file (default: the run's data, else builtin)")
    p.add_argument("--context", type=int, default=1024, help="context tokens L before the target (default 1024)")
    p.add_argument("--target", type=int, default=64, help="target tokens scored after the context (default 64)")
    p.add_argument("--sizes", default="32/1024,96/1024", help="span sizes as fractions of L (default the paper's "
                   "32/1024,96/1024)")
    p.add_argument("--positions", type=int, default=9, help="span starts from leading to trailing (default 9)")
    p.add_argument("--windows", type=int, default=64, help="held-out windows (default 64)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows and the random tokens (default 0)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/eval/step-N, or FOLDER/eval)")
    p.set_defaults(func=run_recency_cmd)
