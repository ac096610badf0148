"""Helpers shared by the tokenizer / prepare / data tests: random documents, jsonl files, directory digests."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

WORDS = "the of and to in thou thee lord king love death night sword crown heart blood 1599 42 ÿ élan 中文 😀".split()


def dir_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative names), to prove a directory was left untouched."""
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def random_docs(rng: random.Random, n: int, max_words: int = 300) -> list[str]:
    """Non-empty multi-line documents of random words, spaces, tabs and newlines (no U+2581)."""
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, max_words)):
            parts.append(rng.choice(WORDS))
            parts.append(rng.choice([" ", " ", " ", "  ", "\n", "\t", ", ", ".\n\n"]))
        docs.append("".join(parts))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path
