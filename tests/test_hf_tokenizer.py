"""Ecosystem tokenizers (tokenizer.json, transformers folders, Hub ids): the ids of the `tokenizers` library, a
fingerprint that survives copies and exports but not changes, one-line refusals, and prepare -> train -> export ->
stock transformers generate with a BPE tokenizer.json built here."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.cli import main
from tests.train_helpers import ROOT, ok, train, write_config
from tokenizer import TokenizerError, load_tokenizer, tokenizer_kind

pytest_plugins = ["tests.data_fixtures"]  # bpe_tokenizer_dir, shakespeare_tokenizer, shakespeare_docs


def random_text(rng, n: int) -> str:
    alphabet = "abcdefghij KLMNOP\n\t.,;é中🙂 <|endoftext|>"
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_ids_are_the_tokenizers_librarys(bpe_tokenizer_dir, rng):
    """Ids equal `tokenizers`' own encoding without special tokens, batch and single, and decode inverts them;
    catches a wrapper that adds BOS/EOS, reorders a batch or drops text."""
    from tokenizers import Tokenizer as Reference

    ref = Reference.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    tok = load_tokenizer(bpe_tokenizer_dir)
    texts = [random_text(rng, rng.randrange(0, 200)) for _ in range(20)]
    expected = [ref.encode(t, add_special_tokens=False).ids for t in texts]
    assert tok.encode_batch(texts) == expected
    assert [tok.encode(t) for t in texts] == expected
    plain = [t.replace("<|endoftext|>", "") for t in texts]  # special tokens decode to nothing
    assert [tok.decode(tok.encode(t)) for t in plain] == plain
    assert (tok.kind, tok.vocab_size, tok.eos_id) == ("hf", ref.get_vocab_size(), ref.token_to_id("<|endoftext|>"))
    assert tok.pad_id == tok.eos_id and tok.bos_id == -1  # no pad token: EOS pads; a bare tokenizer.json has no BOS


def test_fingerprint_survives_copies_not_changes(bpe_tokenizer_dir, tmp_path):
    """The file, its folder and the folder save_pretrained writes (what exports hold) share one fingerprint, and
    a changed vocabulary changes it; catches a training run refusing its own export, or accepting other ids."""
    tok = load_tokenizer(bpe_tokenizer_dir)
    assert load_tokenizer(bpe_tokenizer_dir / "tokenizer.json").fingerprint == tok.fingerprint
    tok.save_pretrained(tmp_path / "copy")
    copy = load_tokenizer(tmp_path / "copy")
    assert (copy.fingerprint, copy.eos_id) == (tok.fingerprint, tok.eos_id)
    spec = json.loads((bpe_tokenizer_dir / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-1]
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "tokenizer.json").write_text(json.dumps(spec))
    assert load_tokenizer(tmp_path / "edited").fingerprint != tok.fingerprint


def test_kinds_and_refusals(bpe_tokenizer_dir, shakespeare_tokenizer, tmp_path):
    """Each reference resolves to its kind; a folder that is no tokenizer is refused in one line; catches our
    exported folders (tokenizer.model + tokenizer.json) being read as transformers tokenizers."""
    assert tokenizer_kind(bpe_tokenizer_dir) == tokenizer_kind("EleutherAI/gpt-neox-20b") == "hf"
    assert tokenizer_kind(shakespeare_tokenizer.path) == "sentencepiece"
    shakespeare_tokenizer.save_pretrained(tmp_path)  # ours plus the HF files: still ours
    assert (tmp_path / "tokenizer.json").is_file() and tokenizer_kind(tmp_path) == "sentencepiece"
    assert load_tokenizer(tmp_path).fingerprint == shakespeare_tokenizer.fingerprint
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="^not a tokenizer: .*empty"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(TokenizerError, match="^not a tokenizer: .*bad.json is not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_unknown_hub_id_offline_is_one_line(tmp_path, shakespeare_docs):
    """Offline, an uncached Hub id fails prepare in one line and writes nothing; catches a traceback or a
    half-written output folder."""
    (tmp_path / "d.txt").write_text(shakespeare_docs[0][:2000])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "prepare", "--dataset", str(tmp_path / "d.txt"),
                          "--tokenizer", "no-such-org/no-such-tokenizer", "--out", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "polar prepare: error: tokenizer no-such-org/no-such-tokenizer not found locally; run with network or "
        "pass a folder"]
    assert not (tmp_path / "out").exists()


def test_prepare_with_tokenizer_json_is_the_reference_stream(tmp_path, bpe_tokenizer_dir, rng):
    """Shards hold each document's `tokenizers` ids followed by EOS, as uint16, and the manifest names the kind and
    fingerprint; catches a missing EOS, a wrong dtype or another tokenizer's ids."""
    from tokenizers import Tokenizer as Reference

    ref = Reference.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))
    docs = [random_text(rng, rng.randrange(1, 300)) for _ in range(30)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert main(["prepare", "--dataset", str(tmp_path / "d.jsonl"), "--tokenizer", str(bpe_tokenizer_dir),
                 "--out", str(tmp_path / "out"), "--val-fraction", "0"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    eos = ref.token_to_id("<|endoftext|>")
    expected = [i for d in docs for i in [*ref.encode(d, add_special_tokens=False).ids, eos]]
    assert np.fromfile(tmp_path / "out" / "train_00000.bin", dtype="<u2").tolist() == expected
    assert manifest["dtype"] == "<u2" and manifest["eos_id"] == eos
    assert manifest["tokenizer"]["kind"] == "hf"
    assert manifest["tokenizer"]["fingerprint"] == load_tokenizer(bpe_tokenizer_dir).fingerprint


@pytest.mark.slow
def test_prepare_train_export_generate(tmp_path, bpe_tokenizer_dir, shakespeare_tokenizer):
    """A run on tokenizer.json data refuses another tokenizer, trains, and exports a folder whose tokenizer has the
    training fingerprint and that stock transformers loads, tokenizes and generates from exactly as our model does;
    catches an export without (or with another) tokenizer, or special ids lost on the way."""
    from transformers import AutoTokenizer, MambaForCausalLM

    from pretrain.export import load_model
    from tests.hf_helpers import assert_same_greedy

    data = tmp_path / "data"
    assert main(["prepare", "--dataset", "builtin:shakespeare", "--tokenizer", str(bpe_tokenizer_dir),
                 "--out", str(data)]) == 0
    tok = load_tokenizer(bpe_tokenizer_dir)
    wrong = write_config(tmp_path, {"path": str(data), "tokenizer": shakespeare_tokenizer.path}, name="wrong")
    assert "was tokenized with tokenizer" in ok(train(wrong), 2).stderr
    cfg = write_config(tmp_path, {"path": str(data), "tokenizer": str(bpe_tokenizer_dir)}, schedule={"steps": 3})
    ok(train(cfg))
    export = tmp_path / "export"
    assert main(["export", str(tmp_path / "runs" / "run"), "--out", str(export)]) == 0
    assert load_tokenizer(export).fingerprint == tok.fingerprint
    theirs_tok = AutoTokenizer.from_pretrained(export)
    prompt_text = "ROMEO. But soft, what light"
    ids = theirs_tok(prompt_text, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0].tolist() == tok.encode(prompt_text)
    theirs = MambaForCausalLM.from_pretrained(export).eval()
    assert theirs.config.eos_token_id == tok.eos_id == theirs_tok.eos_token_id
    with torch.no_grad():
        assert_same_greedy(load_model(tmp_path / "runs" / "run").eval(), theirs, ids, 8)
