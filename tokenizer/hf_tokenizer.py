"""Ecosystem tokenizers: a ``tokenizer.json``, a folder ``transformers.AutoTokenizer`` loads, or a Hub id, behind
the interface of our SentencePiece :class:`tokenizer.tokenizer.Tokenizer` (encode/encode_batch/decode, special ids,
``fingerprint``, ``save_pretrained``).

Special ids (docs/data.md states them per tokenizer):

- EOS, which ends every document in the shards, is the tokenizer's ``eos_token``; a bare ``tokenizer.json`` names
  none, so the first of :data:`EOS_CANDIDATES` in its vocabulary is taken (GPT-NeoX/Pythia: ``<|endoftext|>``, id 0)
  and recorded as ``eos_token`` in exported folders. No EOS at all is refused by ``polar prepare``.
- BOS is the tokenizer's (GPT-NeoX: also ``<|endoftext|>``), never added on encode; pad is ``pad_token`` or, when
  there is none (GPT-NeoX), EOS: padding is only ever masked, so any id in the vocabulary does.
- Text is encoded with ``add_special_tokens=False``; a special token written literally in a document (e.g.
  ``<|endoftext|>``) becomes that token's id, as with ``tokenizers``/datatrove and lm-eval.

The fingerprint is the sha256 of the tokenizer's canonical JSON (``tokenizers``' own serialisation, without the
truncation/padding settings, which do not change ids) and its EOS/BOS/pad ids: the same for the Hub folder, a
copy, and the folder ``polar export`` writes, different for any change that can change ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from tokenizer.tokenizer import TokenizerError

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
HF_FILES = ("tokenizer.json", "tokenizer_config.json")


class HFTokenizer:
    """A fast ``transformers`` tokenizer with our Tokenizer's interface (see the module docstring)."""

    kind = "hf"

    def __init__(self, tok, path: str):
        if not getattr(tok, "is_fast", False):
            raise TokenizerError(f"tokenizer {path} has no fast (tokenizers) version: convert it to a tokenizer.json")
        self._tok = tok
        self.path = path
        if tok.eos_token_id is None:
            name = next((c for c in EOS_CANDIDATES if c in tok.get_vocab()), None)
            if name is not None:
                tok.eos_token = name  # recorded by save_pretrained, so exports agree on the fingerprint
        self.vocab_size: int = len(tok)
        self.eos_id: int = -1 if tok.eos_token_id is None else tok.eos_token_id
        self.bos_id: int = -1 if tok.bos_token_id is None else tok.bos_token_id
        self.unk_id: int = -1 if tok.unk_token_id is None else tok.unk_token_id
        self.pad_id: int = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id
        spec = json.loads(tok.backend_tokenizer.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        canonical = json.dumps({"tokenizer": spec, "eos": self.eos_id, "bos": self.bos_id, "pad": self.pad_id},
                               sort_keys=True, ensure_ascii=False)
        self.fingerprint = hashlib.sha256(canonical.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint[:12]})"

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[list[int]]:
        """Encode with ``tokenizers``' parallel batch encoder (its pool is sized by ``RAYON_NUM_THREADS``, read once
        per process, so ``num_threads`` is not used here: ``polar prepare --num-proc`` sets that variable)."""
        return [e.ids for e in self._tok.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (EOS, BOS, pad) decode to nothing."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        """The text a token contributes (what sentence-boundary detection needs)."""
        return self._tok.decode([int(i)])

    def save_pretrained(self, dest: str | Path) -> None:
        """Write the tokenizer files into ``dest`` (transformers, lm-eval and :func:`load_hf_tokenizer` read them)."""
        self._tok.save_pretrained(str(dest))


def is_hf_tokenizer_path(path: Path) -> bool:
    if path.is_file():
        return path.suffix == ".json"
    return path.is_dir() and any((path / f).is_file() for f in HF_FILES)


def looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) <= 2 and all(parts) and not ref.startswith((".", "~")) and not ref.endswith(".model")


def load_hf_tokenizer(ref: str | os.PathLike) -> HFTokenizer:
    """A ``tokenizer.json`` file, a tokenizer folder, or a Hub id (from the Hub cache, or downloaded)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(ref)
    if p.is_file():
        try:
            return HFTokenizer(PreTrainedTokenizerFast(tokenizer_file=str(p)), str(ref))
        except Exception as e:  # tokenizers raises its own exception types for a malformed file
            raise TokenizerError(f"not a tokenizer: {ref} is not a valid tokenizer.json ({str(e)[:200]})") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(ref))
    except OSError as e:
        if p.exists():
            raise TokenizerError(f"not a tokenizer: {ref} ({str(e).splitlines()[0][:200]})") from e
        raise TokenizerError(f"tokenizer {ref} not found locally; run with network or pass a folder") from e
    return HFTokenizer(tok, str(ref))
