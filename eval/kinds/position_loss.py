"""The ``position_loss`` evaluation: mean loss by token position on long held-out documents, to many times
the training length (`polar eval position_loss`, eval/position_loss.py). Results: ``position_loss_<time>.json``
(per-bucket loss and standard error, the training length) and ``.png``; the sweep figure overlays one line
per run and checkpoint with the training lengths marked."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.registry import DOCS, Evaluation, Score, register


class PositionLossEvaluation(Evaluation):
    name = "position_loss"
    help = "loss by token position on long held-out documents, past the training length"
    description = ("Score long held-out documents from their first token in state-carrying chunks (flat memory "
                   "for SSMs); average the loss per log-spaced position bucket and mark the training length. "
                   f"Writes position_loss_<time>.{{json,png}}. See {DOCS}.")

    def add_options(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=None, help="held-out documents: a prepared data folder (its val split, "
                       "split at EOS), 'builtin' or a text file (default: the run's data, else builtin)")
        p.add_argument("--length", default="8k", help="tokens scored per document, k = 1024 (default 8k)")
        p.add_argument("--windows", type=int, default=8, help="windows of --length tokens, each starting a document "
                       "or continuing the previous window of one (default 8)")
        p.add_argument("--per-octave", type=int, default=2, help="position buckets per doubling (default 2)")
        p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens run in parallel at a time, "
                       "continuing the model's state; bounds memory (default 2048)")
        p.add_argument("--train-length", type=int, default=None, help="the training length to mark (default: "
                       "the run's data.seq_len; none for other models)")

    def settings(self, args: argparse.Namespace):
        from eval.niah import parse_lengths
        from eval.position_loss import PositionLossConfig

        (length,) = parse_lengths(args.length)
        return PositionLossConfig(length=length, windows=args.windows, per_octave=args.per_octave,
                                  prefill_chunk=args.prefill_chunk)

    def run(self, model, tok, settings, args: argparse.Namespace, progress: bool) -> dict:
        from eval.hf_targets import check_positions
        from eval.kinds.recency import default_data, run_data_config
        from eval.position_loss import run_position_loss
        from eval.recency import held_out_tokens

        check_positions(model, settings.length, "position_loss")
        data = args.data or default_data(args.checkpoint, args.step)
        trained = args.train_length or run_data_config(args.checkpoint, args.step).get("seq_len")
        result = run_position_loss(model, held_out_tokens(data, tok), tok.eos_id, settings, trained, progress)
        return {**result, "data": data}

    def write(self, result: dict, folder: Path, stem: str, title: str) -> list[Path]:
        from eval.position_loss import write_position_loss

        return write_position_loss(result, folder, title, stem)

    def report(self, result: dict) -> str:
        return "\n".join(f"positions {b['start']:>7}-{b['end'] - 1:<7} loss {b['loss']:.4f}"
                         for b in result["buckets"])

    def summarize(self, result: dict) -> dict[str, Score]:
        """Mean loss within and beyond the training length (headline; beyond only when the documents reach
        past it), and per bucket ("@" its first position)."""
        buckets, n = result["buckets"], result.get("train_length")
        out = {}
        for name, part in (("within", [b for b in buckets if n is None or b["end"] <= n]),
                           ("beyond", [b for b in buckets if n is not None and b["start"] >= n])):
            if part:
                out[f"position_loss/{name}"] = Score(sum(b["loss"] * (b["end"] - b["start"]) for b in part)
                                                     / sum(b["end"] - b["start"] for b in part))
        for b in buckets:
            out[f"position_loss/loss@{b['start']}"] = Score(b["loss"], b["stderr"])
        return out

    def plot(self, rows: list[dict], path: Path) -> bool:
        """Loss vs position, one line per run and checkpoint, training lengths marked."""
        from eval.position_loss import draw, finish
        from eval.sweep import pyplot

        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in sorted(rows, key=lambda r: (r["run"], r["step"])):
            draw(ax, r["result"], f"{r['run']} @ {r['step']}")
        finish(ax, {r["result"].get("train_length") for r in rows} - {None})
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return True


register(PositionLossEvaluation())
