"""Shared pytest setup: fresh random inputs every run (seed printed for replay), GPU tests skip without CUDA."""

import os
import random
import zlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_report_header(config):
    return f"polar-mamba test seed: {_SEED} (replay with POLAR_TEST_SEED={_SEED})"


_SEED = int(os.environ.get("POLAR_TEST_SEED", random.SystemRandom().randrange(2**31)))


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Each test gets its own fresh (but replayable) seed."""
    seed = (_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield


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
