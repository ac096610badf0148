"""The ``documents`` evaluation: validation loss on whole held-out documents, each from a zero state, beside
the packed-window loss the trainer's validation reports (`polar eval documents`, eval/documents.py; issue 25's
carry vs reset). Result: ``documents_<time>.json``."""

from __future__ import annotations

import argparse

from eval.registry import DOCS, Evaluation, Score, register


class DocumentsEvaluation(Evaluation):
    name = "documents"
    help = "validation loss on whole documents (each from a zero state) and on packed windows"
    description = ("Score every held-out document of a prepared data folder alone from a zero state (truncated to "
                   "the training length) and the val split's packed windows, reset as the run trained. Writes "
                   f"documents_<time>.json. See {DOCS}.")

    def add_options(self, p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", default=None, help="a prepared data folder with document indexes: its val split "
                       "(default: the run's data)")
        p.add_argument("--length", default=None, help="tokens scored per document and per packed window, k = 1024 "
                       "(default: the run's data.seq_len, else 1k)")
        p.add_argument("--documents", type=int, default=0, help="held-out documents scored, in order (default 0: all)")
        p.add_argument("--windows", type=int, default=0, help="packed windows scored, in order (default 0: all)")
        p.add_argument("--packed", default="trained", choices=("trained", "carry", "reset"),
                       help="document boundaries in the packed windows: as the run trained (its "
                       "data.document_boundaries; carry for other models), carry or reset (default trained)")
        p.add_argument("--batch-size", type=int, default=8, help="documents or windows per forward pass (default 8)")

    def settings(self, args: argparse.Namespace):
        from eval.documents import DocumentsConfig
        from eval.kinds.recency import run_data_config
        from eval.niah import parse_lengths

        if args.length is not None:
            (length,) = parse_lengths(args.length)
        else:  # {} for a model that is not a run of ours (and for a sweep checking its option strings)
            length = run_data_config(args.checkpoint, args.step).get("seq_len", 1024)
        return DocumentsConfig(length=length, documents=args.documents, windows=args.windows,
                               batch_size=args.batch_size, packed=args.packed)

    def run(self, model, tok, settings, args: argparse.Namespace, progress: bool) -> dict:
        from pathlib import Path

        from eval.documents import run_documents
        from eval.kinds.recency import run_data_config

        run = run_data_config(args.checkpoint, args.step)
        data = args.data or run.get("path")
        if not data or not (Path(data) / "manifest.json").is_file():
            raise ValueError(f"documents: --data {data}: not a prepared data folder (`polar prepare`); name one with "
                             "--data (its val split is scored)")
        result = run_documents(model, data, settings, run.get("document_boundaries", "carry"), progress)
        return {**result, "data": data}

    def report(self, result: dict) -> str:
        w, p = result["whole"], result["packed"]
        return (f"whole documents  loss {w['loss']:.4f}  ({w['documents']} documents, {w['tokens']} tokens, from a "
                f"zero state)\npacked windows   loss {p['loss']:.4f}  ({p['windows']} windows, {p['tokens']} tokens, "
                f"{p['boundaries']})")

    def summarize(self, result: dict) -> dict[str, Score]:
        """The mean loss per token on whole documents and on packed windows (headline), and the mean of each
        document's mean with its standard error."""
        w = result["whole"]
        return {"documents/whole": Score(w["loss"]), "documents/packed": Score(result["packed"]["loss"]),
                "documents/whole_per_document": Score(w["per_document"], w["stderr"])}

    def card_section(self, results: list[dict], step: int) -> list[str]:
        lines = []
        for r in results:
            w, p, cfg = r["whole"], r["packed"], r["config"]
            lines += ["", f"Validation loss on step {step} (`{r.get('data', '?')}`, val split, {cfg['length']} tokens "
                      "per document and window):", "", "| scored as | loss | documents / windows | tokens |",
                      "|---|---|---|---|",
                      f"| whole documents, each from a zero state | {w['loss']:.4f} | {w['documents']} | "
                      f"{w['tokens']} |",
                      f"| packed windows ({p['boundaries']}) | {p['loss']:.4f} | {p['windows']} | {p['tokens']} |"]
        return lines


register(DocumentsEvaluation())
