"""Shared pytest setup: fresh random inputs every run (seed printed for replay), GPU tests skip without CUDA.

Every test's randomness comes from one per-test seed derived from ``POLAR_TEST_SEED`` (drawn fresh when
unset): torch, ``random`` and numpy's global RNG are seeded with it, and the ``rng`` / ``np_rng`` fixtures
give seeded generators, so any failure replays with the printed seed. Each test records whether it drew
from that seed; with ``POLAR_SEED_REPORT=FILE`` the session writes every test's outcome and that flag as
JSON (read by ``tests/seed_sweep.py``, ``make test-seeds``).
"""

import json
import os
import random
import zlib

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_report_header(config):
    return f"polar-mamba test seed: {_SEED} (replay with POLAR_TEST_SEED={_SEED})"


_SEED = int(os.environ.get("POLAR_TEST_SEED", random.SystemRandom().randrange(2**31)))
_DRAWS = "draws_seed"  # user property: the test consumed randomness derived from POLAR_TEST_SEED


@pytest.fixture
def seed(request) -> int:
    """This test's seed: a function of POLAR_TEST_SEED and the test's id, so a replay needs only the former."""
    return (_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31


@pytest.fixture
def rng(seed) -> random.Random:
    """A ``random.Random`` seeded for this test (never an unseeded ``random.Random()``: it cannot replay)."""
    return random.Random(seed)


@pytest.fixture
def np_rng(seed) -> np.random.Generator:
    """A numpy Generator seeded for this test."""
    return np.random.default_rng(seed)


def _rng_states() -> tuple:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


@pytest.fixture(autouse=True)
def _fresh_seed(request, seed):
    """Each test gets its own fresh (but replayable) seed, and records whether it used it."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    before = _rng_states()
    yield
    after = _rng_states()
    drew = ({"rng", "np_rng"} & set(request.fixturenames) or not torch.equal(before[0], after[0])
            or before[1] != after[1] or not np.array_equal(before[2], after[2]))
    request.node.user_properties.append((_DRAWS, bool(drew)))


_OUTCOMES: dict[str, dict] = {}


def pytest_runtest_logreport(report):
    entry = _OUTCOMES.setdefault(report.nodeid, {"outcome": "passed", "draws_seed": False})
    if report.failed:
        entry["outcome"] = "failed"
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
    entry["draws_seed"] |= any(k == _DRAWS and v for k, v in report.user_properties)


def pytest_sessionfinish(session):
    if path := os.environ.get("POLAR_SEED_REPORT"):
        with open(path, "w") as f:
            json.dump({"seed": _SEED, "tests": _OUTCOMES}, f, indent=1)


@pytest.fixture(params=[pytest.param("cpu", id="interpreter"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")])
def device(request, monkeypatch):
    """Where the Triton kernel tests run: Triton's interpreter on CPU, compiled kernels on CUDA."""
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> dict[str, str]:
    """A 512-piece tokenizer and the prepared builtin corpus (once per session)."""
    from pretrain.cli import main

    base = tmp_path_factory.mktemp("train-data")
    tok, out = base / "tok", base / "data"
    spec = ["--dataset", "builtin:shakespeare"]
    assert main(["tokenizer", "train", *spec, "--vocab-size", "512", "--out", str(tok)]) == 0
    assert main(["prepare", *spec, "--tokenizer", str(tok), "--out", str(out)]) == 0
    return {"tokenizer": str(tok), "path": str(out)}
