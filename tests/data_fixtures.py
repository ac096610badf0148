"""Session fixtures for the tokenizer / prepare / data tests; test modules load them with ``pytest_plugins``."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def shakespeare_docs() -> list[str]:
    from tokenizer.sources import iter_documents

    return list(iter_documents("builtin:shakespeare"))


@pytest.fixture(scope="session")
def shakespeare_tokenizer(tmp_path_factory, shakespeare_docs):
    """A 1000-piece tokenizer trained once per session on the builtin corpus."""
    from tokenizer.train import TrainSettings, train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "shakespeare-1000"
    return train_tokenizer(shakespeare_docs, out, TrainSettings(vocab_size=1000), source="builtin:shakespeare")


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory, shakespeare_docs):
    """A folder holding only a byte-level BPE ``tokenizer.json`` (512 ids, ``<|endoftext|>`` = 0, as GPT-NeoX's
    layout), built here with the ``tokenizers`` library: an ecosystem tokenizer without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(shakespeare_docs[:12], trainer)
    out = tmp_path_factory.mktemp("bpe") / "neox-style"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    return out
