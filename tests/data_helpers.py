"""Helpers shared by the tokenizer / prepare / data tests: random documents, jsonl files, directory digests,
hand-written shard folders."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np

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


FP = "ab" * 32


def write_shards(root: Path, tokens: np.ndarray, cuts: list[int], split: str = "train", fp: str = FP) -> None:
    """A prepared directory written by hand: ``tokens`` cut at ``cuts`` into uint16 shards plus a manifest."""
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, part in enumerate(np.split(tokens.astype("<u2"), cuts)):
        name = f"{split}_{k:05d}.bin"
        (root / name).write_bytes(part.tobytes())
        shards.append({"file": name, "tokens": len(part), "sha256": hashlib.sha256(part.tobytes()).hexdigest()})
    manifest = {
        "format": "polar-tokens",
        "version": 1,
        "tokenizer": {"fingerprint": fp, "vocab_size": 1000},
        "dtype": "<u2",
        "eos_id": 3,
        "splits": {split: {"documents": 1, "tokens": len(tokens), "shards": shards}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))


def byte_level_bpe(docs: list[str], vocab_size: int, out: Path) -> Path:
    """A folder holding only a byte-level BPE ``tokenizer.json`` trained on ``docs`` with the ``tokenizers`` library
    (``<|endoftext|>`` = 0, GPT-NeoX's layout): an ecosystem tokenizer without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    return out

