"""Weighted mixtures (pretrain/mixture.py): shares, per-source epochs, exact resume under any world size, the
refusals, and a mixture run whose metrics, report and plan show each source."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from pretrain.config import ConfigError, build_config
from pretrain.data import DataError, DistributedSampleLoader, PackedDataset, TokenShards
from pretrain.mixture import BLOCK, Mixture, Source
from tests.data_helpers import write_shards

SEQ = 8

pytest_plugins = ["tests.data_fixtures"]  # shakespeare_docs


def source(root, name, low, n_tokens, np_rng, weight=1.0, fp=None):
    """A source whose ids lie in [low, low + 100): a window's ids tell which source it came from."""
    write_shards(root / name, np_rng.integers(low, low + 100, size=n_tokens), [], **({"fp": fp} if fp else {}))
    return Source(name, weight, PackedDataset(TokenShards(root / name), SEQ))


def origin(window: np.ndarray) -> int:
    assert window.min() // 100 == window.max() // 100, "a window mixes sources"
    return int(window.min()) // 100


def test_shares_over_10000_windows_and_exact_counts(tmp_path, np_rng, rng):
    """0.8/0.2 draws within 2% of the shares over 10,000 windows (read back from the windows' ids), and the
    closed-form counts are within one sample of n x share for random weights; catches a drawing rule that favours
    a source or drifts."""
    mix = Mixture([source(tmp_path, "web", 0, 3000, np_rng, 0.8), source(tmp_path, "code", 100, 900, np_rng, 0.2)],
                  seed=rng.randrange(1 << 30))
    loader = DistributedSampleLoader(mix, 100, seed=mix.seed)
    drawn = [w for x, _ in (next(loader) for _ in range(100)) for w in x.numpy()]
    shares = np.bincount([origin(w) for w in drawn], minlength=2) / len(drawn)
    assert len(drawn) == 10_000 and abs(shares[0] - 0.8) <= 0.02 and abs(shares[1] - 0.2) <= 0.02, shares
    weights = [rng.uniform(0.05, 5) for _ in range(rng.randint(2, 5))]
    mix = Mixture([source(tmp_path, f"s{k}", 100 * k, 500, np_rng, w) for k, w in enumerate(weights)], seed=1)
    for n in [rng.randrange(1, 10 * BLOCK) for _ in range(20)]:
        counts = mix.counts(n)
        assert counts.sum() == n and np.all(np.abs(counts - n * np.array(weights) / sum(weights)) < 1)
    g = rng.randrange(1, 4) * BLOCK  # each block holds the closed form's counts
    drawn_from = [mix.locate(i)[0] for i in range(g)]
    assert np.bincount(drawn_from, minlength=len(weights)).tolist() == mix.counts(g).tolist()


def test_each_source_visits_every_window_once_per_epoch(tmp_path, np_rng, rng):
    """A source's draws walk its own permutation: every window once per epoch, a new order the next epoch, the
    same for every seed-mate; catches repeats before a source is exhausted or sources sharing one order."""
    a, b = source(tmp_path, "a", 0, 1000, np_rng, 0.7), source(tmp_path, "b", 100, 400, np_rng, 0.3)
    mix = Mixture([a, b], seed=rng.randrange(1 << 30))
    per_source = {0: [], 1: []}
    for g in range(2 * BLOCK):
        s, w = mix.locate(g)
        per_source[s].append(w)
    for s, ds in enumerate((a.dataset, b.dataset)):
        n = ds.num_samples
        first, second = per_source[s][:n], per_source[s][n : 2 * n]
        assert sorted(first) == sorted(second) == list(range(n)) and first != second


def test_resume_is_bitwise_under_other_world_sizes(tmp_path, np_rng, rng):
    """Two ranks together, or a resume at a random step with three ranks, see exactly the single-process
    sequence; catches mixture state that is not a function of consumed_samples."""
    seed = rng.randrange(1 << 30)
    sources = [source(tmp_path, "a", 0, 2000, np_rng, 3.0), source(tmp_path, "b", 100, 700, np_rng, 1.0)]

    def loaders(world: int, mbs: int, consumed: int = 0) -> list[DistributedSampleLoader]:
        return [DistributedSampleLoader(Mixture(sources, seed), mbs, r, world, seed, consumed) for r in range(world)]

    def rows(ranks: list[DistributedSampleLoader], steps: int) -> dict[int, np.ndarray]:
        out = {}
        for _ in range(steps):
            for r in ranks:
                g = r.sample_indices(r.consumed_samples)
                x, y = next(r)
                out.update({gi: np.append(x[i].numpy(), y[i, -1].item()) for i, gi in enumerate(g)})
        return out

    reference = rows(loaders(1, 6), 12)  # global samples 0..71, one process
    assert {origin(w) for w in reference.values()} == {0, 1}
    two = rows(loaders(2, 3), 12)
    stop = rng.randrange(1, 11) * 6
    three = rows(loaders(3, 2, stop), 2)
    for got in (two, three):
        assert all(np.array_equal(w, reference[g]) for g, w in got.items())
    assert sorted(three) == list(range(stop, stop + 12))


def test_refusals_are_one_line(tmp_path, np_rng):
    """Mixed fingerprints, a share below 1/BLOCK, repeated names, a source shorter than one window, weights <= 0
    and path beside sources are refused naming the fix; catches a mixture silently mixing tokenizers or
    dropping a source."""
    a = source(tmp_path, "a", 0, 500, np_rng)
    with pytest.raises(DataError, match=r"^the sources were tokenized with different tokenizers \(a=abab.*b=cdcd"):
        Mixture([a, source(tmp_path, "b", 100, 500, np_rng, fp="cd" * 32)], 0)
    with pytest.raises(DataError, match=f"^source 'b' has a share below 1/{BLOCK}"):
        Mixture([a, source(tmp_path, "b", 100, 500, np_rng, weight=1e-5)], 0)
    with pytest.raises(DataError, match="^source names repeat"):
        Mixture([a, a], 0)
    write_shards(tmp_path / "short", np_rng.integers(0, 100, size=SEQ), [])
    with pytest.raises(DataError, match=f"^seq_len {SEQ} is longer than the data: .*short has {SEQ} tokens"):
        PackedDataset(TokenShards(tmp_path / "short"), SEQ)
    for weights, where in (([0.5, 0.0], "data.sources[1].weight"), ([-1.0, 1.0], "data.sources[0].weight")):
        with pytest.raises(ConfigError, match=f"^{re.escape(where)} must be > 0"):
            build_config({"data": {"path": None, "sources": [{"path": "a", "weight": w} for w in weights]}})
    with pytest.raises(ConfigError, match="data.path and data.sources are both set"):
        build_config({"data": {"path": "x", "sources": [{"path": "a"}]}})


@pytest.mark.slow
def test_mixture_run_reports_sources_and_resumes_bitwise(tmp_path, data, shakespeare_docs, capsys):
    """A two-source run logs tokens and val loss per source (tokens summing to tokens_seen, shares as weighted),
    prints them, `polar plan` shows each source's epochs and warns past 4, and a run preempted mid-way and
    resumed takes the same steps bit for bit; catches per-source metrics missing or wrong after a resume."""
    from pretrain.cli import main
    from pretrain.metrics import read_jsonl
    from tests.data_helpers import write_jsonl
    from tests.train_helpers import fault_env, losses, ok, preempted, train, write_config

    folders = {}
    for name, docs in (("plays", shakespeare_docs[:20]), ("more", shakespeare_docs[20:])):
        write_jsonl(tmp_path / f"{name}.jsonl", docs)
        folders[name] = tmp_path / name
        assert main(["prepare", "--dataset", str(tmp_path / f"{name}.jsonl"), "--tokenizer", data["tokenizer"],
                     "--out", str(folders[name]), "--val-fraction", "0.1"]) == 0
    mixture = {"path": None, "sources": [{"path": str(folders["plays"]), "weight": 3},
                                         {"path": str(folders["more"]), "weight": 1, "name": "rest"}]}
    prepared = {"tokenizer": data["tokenizer"], **mixture}
    runs = {}
    for name, env in (("straight", None), ("resumed", fault_env(signal_at_step=2))):
        cfg = write_config(tmp_path, prepared, name=name, schedule={"steps": 4}, eval={"every": 2, "batches": 1})
        first = train(cfg, env=env)
        if env:
            preempted(first)
            first = ok(train(cfg))
        runs[name] = ok(first)
    run_dir = tmp_path / "runs"
    assert losses(run_dir / "straight") == losses(run_dir / "resumed")
    records = read_jsonl(run_dir / "resumed" / "metrics.jsonl")
    last = [r for r in records if r["kind"] == "train"][-1]
    assert last["tokens/plays"] + last["tokens/rest"] == last["tokens_seen"]
    assert abs(last["tokens/plays"] / last["tokens_seen"] - 0.75) < 0.01
    val = [r for r in records if r["kind"] == "val"][-1]
    assert {"val_loss/plays", "val_loss/rest"} <= set(val)
    assert min(val["val_loss/plays"], val["val_loss/rest"]) <= val["val_loss"] <= max(val["val_loss/plays"],
                                                                                    val["val_loss/rest"])
    assert "tokens per source: plays" in runs["resumed"].stdout and "(plays " in runs["resumed"].stdout
    manifest = json.loads((folders["more"] / "manifest.json").read_text())
    budget = 40 * manifest["splits"]["train"]["tokens"]  # rest gets 1/4 of it: 10 epochs
    capsys.readouterr()
    assert main(["plan", str(tmp_path / "straight.yaml"), "--schedule.steps", "null",
                 "--schedule.tokens", str(budget)]) == 0
    plan = capsys.readouterr().out
    assert "source rest        25.0% of the samples" in plan and "warning: source rest repeats 10.0 times" in plan
