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
    """A folder holding only a 512-id byte-level BPE ``tokenizer.json`` built here (tests.data_helpers)."""
    from tests.data_helpers import byte_level_bpe

    return byte_level_bpe(shakespeare_docs[:12], 512, tmp_path_factory.mktemp("bpe") / "neox-style")
