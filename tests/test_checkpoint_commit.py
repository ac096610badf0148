"""The commit order of a checkpoint: state file, rename into place, ``latest`` — each durable before the next.

A process can die between any two of those steps. Each test here kills a save (a BaseException raised at the
real call, which nothing in the writer catches, as nothing runs after a SIGKILL) at one step and then reads
the directory as the next run would: ``latest`` must name a complete tag, and resuming must pick it without
the fallback warning that exists for damaged directories.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pretrain import checkpoint as ckpt


class _Killed(BaseException):
    """The process died here (not an OSError: the writer's error handling must not see it)."""


class _FakeEngine:
    """DeepSpeed's ``save_checkpoint`` as far as the commit protocol sees it: files inside the tag folder."""

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict, save_latest: bool) -> None:
        assert not save_latest  # polar moves `latest` itself, after the commit
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        torch.save({"weights": torch.randn(4), **client_state}, folder / "mp_rank_00_model_states.pt")


@pytest.fixture
def process_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def _save(ckpt_dir: Path, step: int, parent: str | None) -> str:
    return ckpt.save(_FakeEngine(), ckpt_dir, step, {"step": step}, {"config": {}}, keep_last=5, rank=0,
                     parent=parent)


def _kill_at(monkeypatch, ckpt_dir: Path, step: int, where: str) -> None:
    """Make the save of ``step`` die at ``where``: "state" (writing the state file), "rename" (moving the
    partial folder into place) or "latest" (writing the ``latest`` file)."""
    partial = ckpt_dir / f"{ckpt.tag_for(step)}{ckpt.PARTIAL_SUFFIX}"
    atomic_write, replace = ckpt.atomic_write, ckpt.os.replace

    def killing_write(path: Path, text: str) -> None:
        if (where == "state" and path == partial / ckpt.STATE_FILE) or (where == "latest" and path.name == "latest"):
            raise _Killed(where)
        atomic_write(path, text)

    def killing_replace(src, dst) -> None:
        if where == "rename" and Path(src) == partial:
            raise _Killed(where)
        replace(src, dst)

    monkeypatch.setattr(ckpt, "atomic_write", killing_write)
    monkeypatch.setattr(ckpt.os, "replace", killing_replace)


@pytest.mark.parametrize("where", ["state", "rename", "latest"])
def test_a_save_killed_between_commit_steps_leaves_latest_on_a_complete_tag(tmp_path, process_group, monkeypatch,
                                                                            caplog, where):
    """Catches a writer that moves ``latest`` before the tag folder is complete and in place (e.g. ``latest``
    written before the rename: killed at the rename, ``latest`` would name a tag that does not exist, and resume
    would need its fallback), and a reader that would take the partial folder for a checkpoint."""
    ckpt_dir = tmp_path / "checkpoints"
    first = _save(ckpt_dir, 1, None)
    with monkeypatch.context() as m:
        _kill_at(m, ckpt_dir, 2, where)
        with pytest.raises(_Killed):
            _save(ckpt_dir, 2, first)

    named = ckpt.latest_tag(ckpt_dir)
    assert named in ckpt.list_tags(ckpt_dir)  # never a missing or partial tag
    assert (ckpt_dir / named / ckpt.STATE_FILE).is_file()
    assert named == first  # the killed save never committed
    complete = ckpt.list_tags(ckpt_dir)
    assert complete == ([first, ckpt.tag_for(2)] if where == "latest" else [first])  # .partial is not a tag
    with caplog.at_level(logging.WARNING, logger=ckpt.__name__):
        assert ckpt.resume_tag(ckpt_dir) == first
        assert ckpt.resolve_tag(ckpt_dir) == first
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no fallback was needed

    # The rerun saves the same step over whatever the killed save left, and commits it.
    again = _save(ckpt_dir, 2, first)
    assert ckpt.latest_tag(ckpt_dir) == ckpt.resume_tag(ckpt_dir) == again == ckpt.tag_for(2)
    assert ckpt.list_tags(ckpt_dir) == [first, again]
    assert not [p for p in ckpt_dir.iterdir() if p.name.endswith((ckpt.PARTIAL_SUFFIX, ckpt.REPLACED_SUFFIX))]
