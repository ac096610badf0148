"""The Tokenizer wrapper: load a SentencePiece model, encode/decode (single and batched), special ids, fingerprint.

Two things on top of plain SentencePiece, both invisible in the results' meaning:

- A literal ``▁`` (U+2581, SentencePiece's whitespace meta symbol) in the input would decode as a space.
  The wrapper encodes it as its three UTF-8 byte pieces instead, so decode(encode(text)) == text always.
- Long texts are cut after newlines into chunks of lines that are encoded in parallel. This gives the same
  ids as encoding the whole text when no piece but the ``\\n`` symbol contains a newline (checked at
  load; true for every model ``polar tokenizer train`` writes), and it is several times faster.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

MODEL_FILE = "tokenizer.model"
META_FILE = "polar_tokenizer.json"
_META_SYMBOL = "\u2581"
_CHUNK_CHARS = 4096  # lines are grouped into chunks of about this size before batch encoding


class TokenizerError(ValueError):
    """A tokenizer path or file is unusable; the message names the problem and the fix."""


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class Tokenizer:
    """A SentencePiece model with exact round-trip encode/decode and fast batch encoding."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, path: str = "<memory>"):
        import sentencepiece as spm

        self.path = path
        self._proto = model_proto
        self.fingerprint = hashlib.sha256(model_proto).hexdigest()
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except RuntimeError as e:
            raise TokenizerError(f"{path} is not a valid SentencePiece model ({e}): retrain it") from e
        self.vocab_size: int = self._sp.get_piece_size()
        self.pad_id: int = self._sp.pad_id()
        self.unk_id: int = self._sp.unk_id()
        self.bos_id: int = self._sp.bos_id()
        self.eos_id: int = self._sp.eos_id()
        byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META_SYMBOL.encode()]
        # Without byte pieces a literal meta symbol can only be left to SentencePiece (lossy, as documented).
        self._meta_ids = byte_ids if all(self._sp.is_byte(i) for i in byte_ids) else None
        self._newline_atomic = all(
            "\n" not in self._sp.id_to_piece(i) or self._sp.id_to_piece(i) == "\n" for i in range(self.vocab_size)
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a directory written by ``polar tokenizer train`` or a bare SentencePiece ``.model`` file."""
        p = Path(path)
        if p.is_dir() and (p / MODEL_FILE).is_file():
            model = p / MODEL_FILE
        elif p.is_file() and p.suffix == ".model":
            model = p
        else:
            raise TokenizerError(
                f"not a tokenizer: {path} (expected a directory from `polar tokenizer train` or a SentencePiece "
                ".model file)"
            )
        tok = cls(model.read_bytes(), str(path))
        meta = model.parent / META_FILE
        if model.name == MODEL_FILE and meta.is_file():
            recorded = json.loads(meta.read_text()).get("fingerprint")
            if recorded != tok.fingerprint:
                raise TokenizerError(
                    f"{model} does not match {meta} (fingerprint {tok.fingerprint[:12]} != {str(recorded)[:12]}): "
                    "the directory was modified; re-run polar tokenizer train"
                )
        return tok

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"

    def _segments(self, text: str) -> list[str | None]:
        """Pieces of ``text`` to encode independently; None stands for a literal meta symbol."""
        parts: list[str | None] = []
        pieces = text.split(_META_SYMBOL) if self._meta_ids is not None else [text]
        for k, piece in enumerate(pieces):
            if k:
                parts.append(None)
            if len(piece) <= _CHUNK_CHARS or not self._newline_atomic:
                parts.append(piece)
                continue
            start = 0
            while start < len(piece):
                cut = piece.find("\n", start + _CHUNK_CHARS)
                end = len(piece) if cut < 0 else cut + 1
                parts.append(piece[start:end])
                start = end
        return parts

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text], num_threads=1)[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode many texts with SentencePiece's multithreaded batch encoder (default: all usable cores)."""
        segs = [self._segments(t) for t in texts]
        flat = [s for ss in segs for s in ss if s]
        encoded = iter(self._sp.encode(flat, num_threads=num_threads or default_threads()) if flat else [])
        out = []
        for ss in segs:
            if len(ss) == 1:
                out.append(next(encoded) if ss[0] else [])
                continue
            ids: list[int] = []
            for s in ss:
                if s is None:
                    ids.extend(self._meta_ids)
                elif s:
                    ids.extend(next(encoded))
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; control ids (pad/bos/eos) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def save_pretrained(self, dest: str | os.PathLike) -> None:
        """Write ``tokenizer.model`` and ``polar_tokenizer.json`` (ours: the trainer's record when there is one, else
        the ids and fingerprint) plus the Hugging Face files with the same ids (tokenizer/hf_files.py) into ``dest``."""
        from tokenizer.hf_files import write_hf_tokenizer_files

        dest, src_meta = Path(dest), Path(self.path) / META_FILE
        (dest / MODEL_FILE).write_bytes(self._proto)
        meta = json.loads(src_meta.read_text()) if src_meta.is_file() else {
            "format": "polar-tokenizer", "model_file": MODEL_FILE, "vocab_size": self.vocab_size, "pad_id": self.pad_id,
            "unk_id": self.unk_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "fingerprint": self.fingerprint}
        (dest / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        write_hf_tokenizer_files(dest / MODEL_FILE, dest)  # so transformers.AutoTokenizer (and lm-eval) load it
