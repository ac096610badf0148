"""Token shards and the resumable sampler, against numpy references on random synthetic shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pretrain.data import DataError, DataNotFoundError, DistributedSampleLoader, PackedDataset, TokenShards
from tests.data_helpers import FP, write_shards


@pytest.fixture
def stream(tmp_path, np_rng):
    rng = np_rng
    tokens = rng.integers(0, 1000, size=int(rng.integers(3000, 6000)))
    cuts = sorted(rng.choice(np.arange(1, len(tokens)), size=5, replace=False).tolist())
    write_shards(tmp_path / "data", tokens, cuts)
    return tmp_path / "data", tokens


def reference_windows(tokens: np.ndarray, seq_len: int, seed: int, start: int, count: int) -> list[np.ndarray]:
    """Global samples start..start+count-1, straight from the contract in pretrain/data.py's docstring."""
    n = (len(tokens) - 1) // seq_len
    out = []
    for g in range(start, start + count):
        perm = np.random.Generator(np.random.PCG64([seed, g // n])).permutation(n)
        w = perm[g % n]
        out.append(tokens[w * seq_len : w * seq_len + seq_len + 1])
    return out


def take(loader: DistributedSampleLoader, steps: int) -> list[np.ndarray]:
    """Windows (input + last label) of ``steps`` micro-batches, in the loader's order."""
    rows = []
    for _ in range(steps):
        x, y = next(loader)
        assert x.dtype == y.dtype and str(x.dtype) == "torch.int64"
        assert (x[:, 1:] == y[:, :-1]).all()
        rows.extend(np.concatenate([x.numpy(), y[:, -1:].numpy()], axis=1))
    return rows


def test_read_across_shards(stream, np_rng):
    path, tokens = stream
    shards = TokenShards(path, expected_fingerprint=FP, verify_checksums=True)
    assert len(shards) == len(tokens) and len(shards.shards) == 6
    rng = np_rng
    for _ in range(200):
        start = int(rng.integers(0, len(tokens)))
        length = int(rng.integers(0, len(tokens) - start + 1))
        np.testing.assert_array_equal(shards.read(start, length), tokens[start : start + length])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq_len=st.integers(1, 300), seed=st.integers(0, 2**32 - 1), mbs=st.integers(1, 5))
def test_single_rank_matches_reference(stream, seq_len, seed, mbs):
    path, tokens = stream  # read-only here, so sharing it across examples is fine
    ds = PackedDataset(TokenShards(path), seq_len)
    assert ds.num_samples == (len(tokens) - 1) // seq_len
    loader = DistributedSampleLoader(ds, mbs, seed=seed)
    got = take(loader, 7)
    for a, b in zip(got, reference_windows(tokens, seq_len, seed, 0, 7 * mbs), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loader.state_dict()["consumed_samples"] == 7 * mbs


def test_same_seed_same_batches_and_resume(stream):
    path, _ = stream
    ds = PackedDataset(TokenShards(path), 64)
    a, b = DistributedSampleLoader(ds, 4, seed=7), DistributedSampleLoader(ds, 4, seed=7)
    first = take(a, 5)
    assert all((x == y).all() for x, y in zip(first, take(b, 5), strict=True))
    state = a.state_dict()
    resumed = DistributedSampleLoader(ds, 4, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives serialization
    assert all((x == y).all() for x, y in zip(take(a, 30), take(resumed, 30), strict=True))
    assert not all((x == y).all() for x, y in zip(first, take(DistributedSampleLoader(ds, 4, seed=8), 5), strict=True))
    with pytest.raises(DataError, match="same seed"):
        DistributedSampleLoader(ds, 4, seed=8).load_state_dict(state)


def test_ranks_interleave_to_single_rank_and_resume_with_other_world_size(stream):
    path, tokens = stream
    seq_len, seed, mbs = 50, 3, 3
    ds = PackedDataset(TokenShards(path), seq_len)
    ranks = [DistributedSampleLoader(ds, mbs, rank=r, world_size=2, seed=seed) for r in range(2)]
    steps = 2 * ds.num_samples // (mbs * 2) + 1  # crosses epoch boundaries
    per_rank = [take(r, steps) for r in ranks]
    interleaved = [w for pair in zip(*per_rank, strict=True) for w in pair]
    single = take(DistributedSampleLoader(ds, 2 * mbs, seed=seed), steps)
    assert all((x == y).all() for x, y in zip(interleaved, single, strict=True))
    # Resume on one rank from the two-rank state: the global sequence continues, nothing repeated or skipped.
    consumed = ranks[0].state_dict()["consumed_samples"]
    assert consumed == ranks[1].state_dict()["consumed_samples"] == steps * mbs * 2
    one = DistributedSampleLoader(ds, 5, rank=0, world_size=1, seed=seed)
    one.load_state_dict(ranks[0].state_dict())
    cont = take(one, 6)
    ref = reference_windows(tokens, seq_len, seed, consumed, 30)
    assert all((x == y).all() for x, y in zip(cont, ref, strict=True))


def test_epochs_cover_every_window_once_and_reshuffle(stream):
    path, tokens = stream
    seq_len = 40
    ds = PackedDataset(TokenShards(path), seq_len)
    n = ds.num_samples
    loader = DistributedSampleLoader(ds, 1, seed=11)
    starts = [int(loader.mixture.locate(g)[1]) for g in range(2 * n)]
    assert sorted(starts[:n]) == list(range(n)) == sorted(starts[n:])
    assert starts[:n] != starts[n:]
    windows = take(loader, n)
    expected = {tuple(tokens[i * seq_len : i * seq_len + seq_len + 1]) for i in range(n)}
    assert {tuple(w) for w in windows} == expected


def test_shard_errors(stream, tmp_path):
    path, tokens = stream
    with pytest.raises(DataError, match=f"tokenized with tokenizer {FP[:12]}, but --tokenizer has ffffffffffff: "
                       "re-run polar prepare with this tokenizer or pass the matching one"):
        TokenShards(path, expected_fingerprint="f" * 64)
    with pytest.raises(DataError, match="seq_len 6000 is longer than the data"):
        PackedDataset(TokenShards(path), 6000)
    with pytest.raises(DataError, match="no split 'val'"):
        TokenShards(path, "val")
    with pytest.raises(DataNotFoundError, match="no manifest.json in .*run polar prepare"):
        TokenShards(tmp_path / "nowhere")

    shard = path / "train_00002.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF  # same size, different content: only the checksum can tell
    shard.write_bytes(bytes(data))
    TokenShards(path)
    with pytest.raises(DataError, match="train_00002.bin is corrupt: its sha256 differs"):
        TokenShards(path, verify_checksums=True)
    shard.write_bytes(bytes(data[:-1]))
    with pytest.raises(DataError, match=r"train_00002.bin is truncated or corrupt: \d+ bytes, the manifest says"):
        TokenShards(path)
    shard.unlink()
    with pytest.raises(DataNotFoundError, match="train_00002.bin is missing"):
        TokenShards(path)


def test_loader_on_prepared_corpus(tmp_path, rng):
    """End to end on real prepared data: each row is its window of the val split's files."""

    from pretrain.prepare import PrepareConfig, prepare
    from tests.data_helpers import random_docs, write_jsonl
    from tokenizer.train import TrainSettings, train_tokenizer

    docs = random_docs(rng, 80)
    src = write_jsonl(tmp_path / "d.jsonl", docs)
    tok = train_tokenizer(docs, tmp_path / "tok", TrainSettings(vocab_size=400))
    prepare(PrepareConfig(str(src), tok.path, str(tmp_path / "data"), val_fraction=0.1, shard_tokens=1000))
    val = np.concatenate([np.fromfile(p, dtype="<u2") for p in sorted((tmp_path / "data").glob("val_*.bin"))])
    ds = PackedDataset(TokenShards(tmp_path / "data", "val", expected_fingerprint=tok.fingerprint), 16)
    loader = DistributedSampleLoader(ds, 2, seed=0)
    x, y = next(loader)
    for k in range(2):
        w = loader.mixture.locate(k)[1]
        np.testing.assert_array_equal(x[k].numpy(), val[w * 16 : w * 16 + 16])
        np.testing.assert_array_equal(y[k].numpy(), val[w * 16 + 1 : w * 16 + 17])
