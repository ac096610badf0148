"""The ``recency`` evaluation: the paper's Table 1/3 robustness probe (`polar eval recency`, eval/recency.py):
loss and top-1 accuracy on a target window when a leading, middle or trailing context span is random.
Results: ``recency_<time>.json``, ``.md`` (Table 1's layout) and ``.png`` (drop vs span position)."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.registry import DOCS, Evaluation, Score, register


def run_data_config(checkpoint: str, step: int | None) -> dict:
    """The ``data`` section of the run config a checkpoint of ours was trained with ({} for other models)."""
    from pretrain import checkpoint as ckpt
    from pretrain.export import checkpoint_location

    loc = checkpoint_location(checkpoint, step) if Path(checkpoint).exists() else None
    return ckpt.read_state(*loc)["config"]["data"] if loc else {}


def default_data(checkpoint: str, step: int | None) -> str:
    """The run's own prepared data (its val split) when the checkpoint is a run of ours, else 'builtin'."""
    data = run_data_config(checkpoint, step).get("path")
    return data if data and (Path(data) / "manifest.json").is_file() else "builtin"


class RecencyEvaluation(Evaluation):
    name = "recency"
    help = "robustness to a corrupted context span: leading vs middle vs trailing (paper Table 1/3)"
    description = ("On held-out windows, replace a context span (leading to trailing) with random tokens and "
                   "measure loss and top-1 accuracy on the target tokens after it, against clean windows. "
                   f"Writes recency_<time>.{{json,md,png}}. See {DOCS} and docs/studies.md.")

    def add_options(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=None, help="held-out tokens: a prepared data folder (its val split), "
                       "'builtin' (the builtin corpus's held-out documents) or a text file (default: the run's "
                       "data, else builtin)")
        p.add_argument("--context", type=int, default=1024, help="context tokens L before the target (default 1024)")
        p.add_argument("--target", type=int, default=64, help="target tokens scored after the context (default 64)")
        p.add_argument("--sizes", default="32/1024,96/1024", help="span sizes as fractions of L (default the "
                       "paper's 32/1024,96/1024)")
        p.add_argument("--positions", type=int, default=9, help="span starts from leading to trailing (default 9)")
        p.add_argument("--windows", type=int, default=64, help="held-out windows (default 64)")
        p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
        p.add_argument("--seed", type=int, default=0, help="seed of the windows and the random tokens (default 0)")

    def settings(self, args: argparse.Namespace):
        from eval.recency import RecencyConfig, parse_fraction

        return RecencyConfig(context=args.context, target=args.target, positions=args.positions,
                             windows=args.windows, batch_size=args.batch_size, seed=args.seed,
                             sizes=[parse_fraction(s) for s in args.sizes.split(",")])

    def run(self, model, tok, settings, args: argparse.Namespace, progress: bool) -> dict:
        from eval.recency import held_out_tokens, run_recency

        data = args.data or default_data(args.checkpoint, args.step)
        vocab = min(tok.vocab_size, model.config.vocab_size)  # random tokens both the tokenizer and the model know
        return {**run_recency(model, held_out_tokens(data, tok), vocab, settings, progress), "data": data}

    def write(self, result: dict, folder: Path, stem: str, title: str) -> list[Path]:
        from eval.recency import write_recency

        return list(write_recency(result, folder, title, stem).values())

    def report(self, result: dict) -> str:
        from eval.recency import markdown_table

        return markdown_table(result).rstrip("\n")

    def summarize(self, result: dict) -> dict[str, Score]:
        """Clean loss and accuracy; the loss increase of the leading and trailing span, averaged over sizes
        (headline) and per size ("@" the span in tokens)."""
        clean, context = result["clean"], result["config"]["context"]
        out = {"recency/clean_loss": Score(clean["loss"]), "recency/clean_acc": Score(clean["acc"])}
        per_size = {}
        for size in result["config"]["sizes"]:
            rows = [r for r in result["spans"] if r["size"] == size]
            per_size[max(1, round(size * context))] = {"first": rows[0], "last": rows[-1]}
        for end in ("first", "last"):
            out[f"recency/{end}_loss_increase"] = Score(
                sum(s[end]["loss_increase"] for s in per_size.values()) / len(per_size))
        for n, s in per_size.items():
            for end in ("first", "last"):
                out[f"recency/{end}_loss_increase@{n}"] = Score(s[end]["loss_increase"])
        return out

    def card_section(self, results: list[dict], step: int) -> list[str]:
        from eval.recency import markdown_table

        lines = []
        for r in results:
            cfg = r["config"]
            lines += ["", f"Recency probe on step {step} (paper Table 1/3): {cfg['windows']} held-out windows of "
                      f"`{r.get('data', '?')}`, {cfg['context']} context tokens, {cfg['target']} target tokens, "
                      f"seed {cfg['seed']}; a span of random tokens first, in the middle or last in the context.", "",
                      *markdown_table(r).rstrip("\n").splitlines()]
        return lines


register(RecencyEvaluation())
