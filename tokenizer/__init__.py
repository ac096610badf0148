"""SentencePiece tokenizer training and the Tokenizer wrapper (standalone: imports nothing else of the project)."""
