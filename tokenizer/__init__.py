"""SentencePiece tokenizer training and the Tokenizer wrapper (standalone: imports nothing else of the project)."""

from tokenizer.tokenizer import Tokenizer, TokenizerError

__all__ = ["Tokenizer", "TokenizerError"]
