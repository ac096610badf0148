"""Session fixtures for the evaluation tests (harness, NIAH, sweep); test modules load them with ``pytest_plugins``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def eval_tokenizer_dir(tmp_path_factory) -> Path:
    """A 512-piece tokenizer trained by `polar tokenizer train` on the builtin corpus."""
    from pretrain.cli import main

    out = tmp_path_factory.mktemp("eval-tok") / "tok"
    argv = ["tokenizer", "train", "--dataset", "builtin:shakespeare", "--vocab-size", "512", "--out", str(out)]
    assert main(argv) == 0
    return out


def tiny_model(seed: int = 0, **overrides):
    """A small polarized MambaLM (random weights: the tests compare computations, not quality)."""
    from models import MambaLM, ModelConfig

    torch.manual_seed(seed)
    cfg = {"polarize.ones": 1, "polarize.zeros": 1, "d_model": 32, "vocab_size": 512, **overrides}
    return MambaLM(ModelConfig.preset("mamba-tiny", **cfg)).eval()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, eval_tokenizer_dir) -> Path:
    """An exported folder as `polar export` writes it: weights, config and our + Hugging Face tokenizer files."""
    from models.hf import save_pretrained
    from pretrain.export import copy_tokenizer

    out = save_pretrained(tiny_model(), tmp_path_factory.mktemp("eval-export") / "export")
    copy_tokenizer(eval_tokenizer_dir, out)
    return out


@pytest.fixture(scope="session")
def offline_tasks(tmp_path_factory) -> Path:
    from eval.tasks.generate import write_tasks

    return write_tasks(tmp_path_factory.mktemp("eval-tasks"), n=8)
