"""One entry point for every tokenizer kind: ``load_tokenizer(REF)`` for ``--tokenizer`` / ``data.tokenizer``.

REF is, in this order of recognition: our folder (``polar_tokenizer.json`` beside ``tokenizer.model``, as
``polar tokenizer train`` and ``polar export`` write) or a bare SentencePiece ``.model`` file; a ``tokenizer.json``
file or a folder ``transformers.AutoTokenizer`` loads (``tokenizer.json`` / ``tokenizer_config.json``); a folder
with only ``tokenizer.model``; otherwise a Hub id (``EleutherAI/gpt-neox-20b``), read from the Hub cache or downloaded.
Both kinds share one interface (encode/encode_batch/decode, special ids, ``fingerprint``, ``save_pretrained``).
"""

from __future__ import annotations

import os
from pathlib import Path

from tokenizer.hf_tokenizer import HFTokenizer, is_hf_tokenizer_path, load_hf_tokenizer, looks_like_hub_id
from tokenizer.tokenizer import META_FILE, MODEL_FILE, Tokenizer, TokenizerError

EXPECTED = ("expected a directory from `polar tokenizer train`, a SentencePiece .model file, a tokenizer.json, a "
            "transformers tokenizer folder or a Hub id such as EleutherAI/gpt-neox-20b")


def tokenizer_kind(ref: str | os.PathLike) -> str:
    """``sentencepiece`` (ours) or ``hf``; raises for a path that is neither."""
    p = Path(ref)
    if (p / META_FILE).is_file() or (p.is_file() and p.suffix == ".model"):
        return "sentencepiece"
    if is_hf_tokenizer_path(p):
        return "hf"
    if (p / MODEL_FILE).is_file():
        return "sentencepiece"
    if not p.exists() and looks_like_hub_id(str(ref)):
        return "hf"
    raise TokenizerError(f"not a tokenizer: {ref} ({EXPECTED})")


def load_tokenizer(ref: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """The tokenizer REF names (see the module docstring); one-line :class:`TokenizerError` when it cannot."""
    return Tokenizer.load(ref) if tokenizer_kind(ref) == "sentencepiece" else load_hf_tokenizer(ref)
