"""Train a SentencePiece BPE tokenizer whose decode(encode(text)) == text, and write its directory atomically.

The output directory holds ``tokenizer.model`` (the SentencePiece model) and ``polar_tokenizer.json``
(vocab size, special ids, fingerprint, the training settings and source).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizer.atomic import write_atomically
from tokenizer.tokenizer import META_FILE, MODEL_FILE, Tokenizer, TokenizerError, default_threads

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Byte fallback needs 256 byte pieces, plus the 4 specials and "\n".
MIN_VOCAB_SIZE = 256 + 4 + 1 + 3


@dataclass(frozen=True)
class TrainSettings:
    """SentencePiece trainer settings; the defaults make encoding lossless (see docs/data.md)."""

    vocab_size: int = 32000
    model_type: str = "bpe"
    byte_fallback: bool = True  # characters outside the vocab become UTF-8 byte pieces, never <unk>
    normalization_rule_name: str = "identity"  # no NFKC: the text is kept as written
    remove_extra_whitespaces: bool = False
    allow_whitespace_only_pieces: bool = True  # runs of spaces (indentation) get their own pieces
    add_dummy_prefix: bool = False  # no invented leading space, so text at string start round-trips
    split_digits: bool = True  # numbers are spelled digit by digit (better arithmetic, no digit-merge noise)
    user_defined_symbols: tuple[str, ...] = ("\n",)  # newline is one atomic piece
    character_coverage: float = 0.9995
    max_sentence_length: int = 1 << 16  # bytes; longer training lines are cut, not dropped
    input_sentence_size: int = 5_000_000  # lines sampled for training (memory bound on huge inputs)
    pad_id: int = 0
    unk_id: int = 1
    bos_id: int = 2
    eos_id: int = 3

    def __post_init__(self) -> None:
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise TokenizerError(
                f"--vocab-size {self.vocab_size} is too small: byte fallback needs at least {MIN_VOCAB_SIZE}"
            )
        if self.vocab_size > 1 << 32:
            raise TokenizerError(f"--vocab-size {self.vocab_size} is too large: at most {1 << 32}")


def training_lines(documents: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Documents as lines (newline is its own piece, so nothing is learned across it), long lines cut."""
    max_chars = max_bytes // 4  # a character is at most 4 UTF-8 bytes
    for doc in documents:
        for line in doc.split("\n"):
            for i in range(0, len(line), max_chars):
                yield line[i : i + max_chars]


def train_model(documents: Iterable[str], settings: TrainSettings, num_threads: int | None = None) -> tuple[bytes, int]:
    """Train on ``documents``; returns the serialized model and the number of documents read."""
    import sentencepiece as spm

    counted = 0

    def lines() -> Iterator[str]:
        nonlocal counted
        for doc in documents:
            counted += 1
            yield from training_lines([doc], settings.max_sentence_length)

    kwargs = dataclasses.asdict(settings)
    kwargs["user_defined_symbols"] = list(settings.user_defined_symbols)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=buf,
            shuffle_input_sentence=True,
            num_threads=num_threads or default_threads(),
            minloglevel=2,
            **kwargs,
        )
    except RuntimeError as e:
        if counted == 0:
            raise TokenizerError("no documents to train on: the input is empty") from e
        # e.g. "Vocabulary size too high (N). Please set it to a value <= M."
        reason = str(e).strip().splitlines()[-1].rpartition("] ")[2]
        raise TokenizerError(f"SentencePiece training failed: {reason}") from e
    if counted == 0:
        raise TokenizerError("no documents to train on: the input is empty")
    return buf.getvalue(), counted


def metadata(tok: Tokenizer, settings: TrainSettings, source: str, documents: int) -> dict:
    return {
        "format": "polar-tokenizer",
        "version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "vocab_size": tok.vocab_size,
        "pad_id": tok.pad_id,
        "unk_id": tok.unk_id,
        "bos_id": tok.bos_id,
        "eos_id": tok.eos_id,
        "fingerprint": tok.fingerprint,
        "source": source,
        "documents": documents,
        "settings": dataclasses.asdict(settings),
    }


def train_tokenizer(
    documents: Iterable[str],
    out: str | os.PathLike,
    settings: TrainSettings,
    source: str = "",
    force: bool = False,
    num_threads: int | None = None,
) -> Tokenizer:
    """Train and write ``out/tokenizer.model`` + ``out/polar_tokenizer.json``; returns the loaded tokenizer."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists: pass --force to replace it")
    proto, n_docs = train_model(documents, settings, num_threads)
    tok = Tokenizer(proto, str(out))

    def fill(tmp: Path) -> None:
        (tmp / MODEL_FILE).write_bytes(proto)
        (tmp / META_FILE).write_text(json.dumps(metadata(tok, settings, source, n_docs), indent=2) + "\n")

    write_atomically(out, fill, force)
    log.info("trained %s on %d documents of %s", tok, n_docs, source)
    return Tokenizer.load(out)
