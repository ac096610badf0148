"""Tokenizers: SentencePiece training and our Tokenizer wrapper, ecosystem tokenizers (tokenizer.json, transformers
folders, Hub ids) behind the same interface, and ``load_tokenizer`` for all of them (standalone: imports nothing
else of the project)."""

from tokenizer.load import load_tokenizer, tokenizer_kind
from tokenizer.tokenizer import Tokenizer, TokenizerError

__all__ = ["Tokenizer", "TokenizerError", "load_tokenizer", "tokenizer_kind"]
