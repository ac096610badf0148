"""The tokenizer package's commands: `polar tokenizer train` (a lossless SentencePiece BPE tokenizer from files or a
dataset spec; the logic is tokenizer/train.py)."""

from __future__ import annotations

import argparse

SPEC_HELP = (
    "builtin:shakespeare (embedded corpus, offline), hf:NAME[:CONFIG][@SPLIT] (Hugging Face dataset, streamed), "
    "or local .jsonl/.json/.parquet/.txt files, globs or directories (comma-separated)"
)


def run_train(args: argparse.Namespace) -> int:
    import itertools

    from tokenizer.sources import iter_documents
    from tokenizer.train import TrainSettings, train_tokenizer

    spec = ",".join(args.input) if args.input else args.dataset
    settings = TrainSettings(vocab_size=args.vocab_size, character_coverage=args.character_coverage)
    docs = iter_documents(spec, args.text_field)
    if args.max_documents is not None:
        docs = itertools.islice(docs, args.max_documents)
    tok = train_tokenizer(docs, args.out, settings, source=spec, force=args.force, num_threads=args.num_threads)
    print(f"wrote {args.out}: vocab {tok.vocab_size}, fingerprint {tok.fingerprint}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    group = sub.add_parser(
        "tokenizer",
        help="train a tokenizer",
        description="Tokenizer commands. `polar tokenizer train --help` explains training.",
    )
    tsub = group.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)
    p = tsub.add_parser(
        "train",
        help="train a SentencePiece BPE tokenizer",
        description="Train a SentencePiece BPE tokenizer with byte fallback and no normalization, so that "
        "decode(encode(text)) == text for any UTF-8 text. Special ids: pad=0, unk=1, bos=2, eos=3. Writes "
        "OUT/tokenizer.model and OUT/polar_tokenizer.json (vocab, special ids, fingerprint). See docs/data.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", metavar="FILE", help="local .jsonl/.json/.parquet/.txt files, globs or dirs")
    src.add_argument("--dataset", metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--vocab-size", type=int, required=True, metavar="N", help="vocabulary size (>= 264)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--text-field", default="text", metavar="F", help="text field of json/parquet/hub records")
    p.add_argument("--max-documents", type=int, metavar="N", help="train on the first N documents only")
    p.add_argument("--character-coverage", type=float, default=0.9995, help="share of characters given own pieces")
    p.add_argument("--num-threads", type=int, metavar="N", help="trainer threads (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run_train)
