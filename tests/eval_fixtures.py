"""Session fixtures for the evaluation tests (harness, NIAH, sweep); test modules load them with ``pytest_plugins``."""

from __future__ import annotations

import json
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
    from tokenizer import load_tokenizer

    out = save_pretrained(tiny_model(), tmp_path_factory.mktemp("eval-export") / "export")
    load_tokenizer(eval_tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def offline_tasks(tmp_path_factory) -> Path:
    from eval.tasks.generate import write_tasks

    return write_tasks(tmp_path_factory.mktemp("eval-tasks"), n=8)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, eval_tokenizer_dir) -> Path:
    """A run directory as `polar train` leaves it, with ZeRO-0 checkpoints at steps 3 and 5 (different random
    weights) naming the tokenizer; written directly, so no training is needed."""
    from pretrain import checkpoint as ckpt

    run = tmp_path_factory.mktemp("eval-run") / "run"
    for seed, step in ((0, 3), (1, 5)):
        model = tiny_model(seed)
        tag = run / "checkpoints" / ckpt.tag_for(step)
        tag.mkdir(parents=True)
        torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
        config = {"model": model.config.to_dict(), "distributed": {"zero_stage": 0},
                  "data": {"tokenizer": str(eval_tokenizer_dir)}}
        (tag / ckpt.STATE_FILE).write_text(json.dumps({"config": config, "step": step}))
    (run / "checkpoints" / "latest").write_text(ckpt.tag_for(5))
    return run


def restrict_task_index(monkeypatch, keep: str | None) -> None:
    """lm-eval indexes its ~14k built-in task YAMLs on every run (tens of seconds on a loaded CPU): index only
    the built-in folder ``keep`` (None: none of them) beside --include_path."""
    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex

    builtin, build = Path(lm_eval.tasks.__file__).parent, TaskIndex.build

    def restricted(paths, **kw):
        kept = [p for p in paths if Path(p) != builtin]
        return build(kept + ([builtin / keep] if keep else []), **kw)

    monkeypatch.setattr(TaskIndex, "build", staticmethod(restricted))


@pytest.fixture
def offline_task_index(monkeypatch):
    """The tests' offline tasks (--include_path) only."""
    restrict_task_index(monkeypatch, None)


@pytest.fixture
def ruler_task_index(monkeypatch):
    """lm-eval's RULER tasks beside --include_path."""
    restrict_task_index(monkeypatch, "ruler")