"""`polar prepare`: token counts against an independent encoding, exact decode, determinism, atomic errors, CLI."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from pretrain.cli import main
from pretrain.data import DataError, TokenShards, dtype_for_vocab
from pretrain.prepare import PrepareConfig, prepare
from tests.data_helpers import dir_digest, random_docs, write_jsonl
from tokenizer.sources import SourceError

pytest_plugins = ["tests.data_fixtures"]  # session fixtures: shakespeare_docs, shakespeare_tokenizer


def read_split(out: Path, split: str) -> np.ndarray:
    """All tokens of a split, read straight from the files the manifest lists (no pretrain.data)."""
    manifest = json.loads((out / "manifest.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=manifest["dtype"])


def check_prepared(out: Path, docs: list[str], tok, val_fraction: float) -> None:
    """Manifest == shard contents == an independent SentencePiece count; shards decode to the documents."""
    manifest = json.loads((out / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(Path(tok.path) / "tokenizer.model"))
    assert manifest["tokenizer"]["fingerprint"] == tok.fingerprint
    assert manifest["dtype"] == "<u2" and manifest["eos_id"] == 3
    decoded = {}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            data = (out / shard["file"]).read_bytes()
            assert len(data) == shard["tokens"] * 2
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        tokens = read_split(out, split)
        assert len(tokens) == info["tokens"]
        ends = np.flatnonzero(tokens == 3)
        assert len(ends) == info["documents"] and (len(tokens) == 0 or ends[-1] == len(tokens) - 1)
        assert TokenShards(out, split).document_ends().tolist() == (ends + 1).tolist()  # the index: after each EOS
        decoded[split] = [sp.decode(d.tolist()) for d in np.split(tokens, ends + 1)[:-1]]
    # Val: the evenly spread ceil(n*f) documents, including the first; both splits keep document order.
    n_val = math.ceil(len(docs) * val_fraction)
    assert len(decoded["val"]) == n_val
    if n_val:
        assert decoded["val"][0] == docs[0]
    rest = iter(docs)
    assert all(any(d == r for r in rest) for d in decoded["train"])  # train is a subsequence of docs
    assert sorted(decoded["train"] + decoded["val"]) == sorted(docs)
    total = sum(len(ids) + 1 for ids in sp.encode(docs))
    assert sum(s["tokens"] for s in manifest["splits"].values()) == total


def test_jsonl_and_txt(tmp_path, shakespeare_tokenizer, rng):
    docs = random_docs(rng, 120)
    write_jsonl(tmp_path / "part1.jsonl", docs[:70])
    write_jsonl(tmp_path / "part2.jsonl", docs[70:])
    out = tmp_path / "jsonl"
    prepare(PrepareConfig(str(tmp_path / "part*.jsonl"), shakespeare_tokenizer.path, str(out), val_fraction=0.05,
                          shard_tokens=rng.randint(500, 5000), batch_chars=rng.randint(1000, 20000)))
    check_prepared(out, docs, shakespeare_tokenizer, 0.05)
    assert len(json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]) > 1

    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, d in enumerate(docs[:20]):
        (txt_dir / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    prepare(PrepareConfig(str(txt_dir), shakespeare_tokenizer.path, str(tmp_path / "txt_out"), val_fraction=0.0))
    check_prepared(tmp_path / "txt_out", docs[:20], shakespeare_tokenizer, 0.0)


def test_json_list_and_parquet(tmp_path, shakespeare_tokenizer, rng):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = random_docs(rng, 30)
    (tmp_path / "a.json").write_text(json.dumps([{"content": d} for d in docs[:10]]))
    pq.write_table(pa.table({"content": docs[10:], "n": list(range(20))}), tmp_path / "b.parquet")
    spec = f"{tmp_path / 'a.json'},{tmp_path / 'b.parquet'}"
    out = tmp_path / "out"
    assert main(["prepare", "--dataset", spec, "--tokenizer", shakespeare_tokenizer.path, "--out", str(out),
                 "--text-field", "content", "--val-fraction", "0.1"]) == 0
    check_prepared(out, docs, shakespeare_tokenizer, 0.1)


@pytest.mark.slow
def test_builtin_is_deterministic(tmp_path, shakespeare_tokenizer, shakespeare_docs):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        assert main(["prepare", "--dataset", "builtin:shakespeare", "--tokenizer", shakespeare_tokenizer.path,
                     "--out", str(out), "--shard-tokens", "700000", "--num-proc", "2"]) == 0
    check_prepared(outs[0], shakespeare_docs, shakespeare_tokenizer, 0.01)
    assert dir_digest(outs[0]) == dir_digest(outs[1])
    assert len(dir_digest(outs[0])) > 3  # several train shards


def test_bad_input_keeps_existing_output(tmp_path, shakespeare_tokenizer, capsys, rng):
    docs = random_docs(rng, 20)
    src = write_jsonl(tmp_path / "docs.jsonl", docs)
    out = tmp_path / "data"
    tok = shakespeare_tokenizer.path
    prepare(PrepareConfig(str(src), tok, str(out)))
    before = dir_digest(out)

    with pytest.raises(FileExistsError, match="already exists: pass --force"):
        prepare(PrepareConfig(str(src), tok, str(out)))
    with pytest.raises(SourceError, match="no field 'body'; available fields: text, id .*--text-field"):
        prepare(PrepareConfig(str(src), tok, str(out), force=True, text_field="body"))
    with pytest.raises(FileNotFoundError, match="no files match"):
        prepare(PrepareConfig(str(tmp_path / "missing*.jsonl"), tok, str(out), force=True))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(DataError, match="no documents in .*empty"):
        prepare(PrepareConfig(str(tmp_path / "empty.jsonl"), tok, str(out), force=True))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:2: not valid JSON"):
        prepare(PrepareConfig(str(tmp_path / "bad.jsonl"), tok, str(out), force=True))
    with pytest.raises(ValueError, match="not a tokenizer"):
        prepare(PrepareConfig(str(src), str(tmp_path), str(out), force=True))
    with pytest.raises(DataError, match="--val-fraction must be in"):
        PrepareConfig(str(src), tok, str(out), val_fraction=1.0)
    write_jsonl(tmp_path / "one.jsonl", docs[:1])
    with pytest.raises(DataError, match="all held out for validation"):
        prepare(PrepareConfig(str(tmp_path / "one.jsonl"), tok, str(out), force=True, val_fraction=0.5))
    # Through the CLI: one line, exit status 2.
    assert main(["prepare", "--dataset", str(src), "--tokenizer", tok, "--out", str(out), "--force",
                 "--text-field", "body"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after tqdm's progress lines
    assert err.startswith("polar prepare: error:") and "no field 'body'" in err

    assert dir_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no temporary directories left behind
        ["data", "docs.jsonl", "empty.jsonl", "bad.jsonl", "one.jsonl"]
    )
    # --force with good input replaces it.
    prepare(PrepareConfig(str(src), tok, str(out), force=True, val_fraction=0.2))
    assert dir_digest(out) != before
    check_prepared(out, docs, shakespeare_tokenizer, 0.2)


def test_dtype_for_vocab():
    assert dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32


def test_document_index_marks_every_boundary(tmp_path, shakespeare_tokenizer, rng):
    """Each window's document starts are exactly the positions after an EOS (read from the tokens), with documents
    crossing shards and batches; a damaged index is refused and a v1 folder (no index) still loads but says to
    re-prepare; catches an index off by one, lost at a shard boundary, or silently missing."""
    from pretrain.data import PackedDataset

    out = tmp_path / "out"
    prepare(PrepareConfig(dataset=str(write_jsonl(tmp_path / "d.jsonl", random_docs(rng, 60))),
                          tokenizer=shakespeare_tokenizer.path, out=str(out), val_fraction=0.0,
                          shard_tokens=rng.randint(300, 3000), batch_chars=rng.randint(1000, 20000)))
    tokens = read_split(out, "train")
    ds = PackedDataset(TokenShards(out, "train"), rng.randint(8, 200))
    for i in range(ds.num_samples):
        start = i * ds.seq_len
        expected = [p for p in range(1, ds.seq_len + 1) if tokens[start + p - 1] == 3]
        assert ds.document_starts(i).tolist() == expected
    manifest = json.loads((out / "manifest.json").read_text())
    index = out / manifest["splits"]["train"]["shards"][-1]["index"]
    index.write_bytes(index.read_bytes()[:-1])
    with pytest.raises(DataError, match=f"^document index {index} is missing, truncated or corrupt: re-run"):
        TokenShards(out, "train")
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["index"], shard["document_ends"]
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(DataError, match="prepared without document indexes .* re-run polar prepare"):
        TokenShards(out, "train").document_ends()
