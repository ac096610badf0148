"""`polar prepare` on datatrove (pretrain/prepare_engine.py): the output does not depend on workers or tasks, and a
prepare killed with kill -9 and rerun redoes only its unfinished tasks and writes the same bytes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from pretrain.prepare import PrepareConfig, prepare
from pretrain.prepare_engine import work_dir
from tests.data_helpers import dir_digest, random_docs, write_jsonl
from tests.train_helpers import ROOT

pytest_plugins = ["tests.data_fixtures"]  # shakespeare_tokenizer, bpe_tokenizer_dir


def test_workers_and_tasks_do_not_change_a_byte(tmp_path, shakespeare_tokenizer, rng):
    """One task in one process, and one task per file on two worker processes, write identical folders (shards,
    indexes, manifest) and leave no work folder; catches tasks merged out of order or documents lost between
    tasks."""
    files = [write_jsonl(tmp_path / f"part{k}.jsonl", random_docs(rng, rng.randint(1, 25), 60)) for k in range(5)]
    spec, shard_tokens = ",".join(map(str, files)), rng.randint(300, 3000)
    outs = []
    for workers, tasks in ((1, 1), (2, 64)):
        out = tmp_path / f"out-{workers}-{tasks}"
        prepare(PrepareConfig(spec, shakespeare_tokenizer.path, str(out), val_fraction=0.1, workers=workers,
                              tasks=tasks, shard_tokens=shard_tokens))
        outs.append(out)
        assert not work_dir(out).exists()
    digests = [dir_digest(o) for o in outs]
    assert digests[0] == digests[1] and len(digests[0]) > 3


@pytest.mark.slow
def test_killed_prepare_reruns_only_unfinished_tasks(tmp_path, bpe_tokenizer_dir):
    """kill -9 once a few of 38 tasks are done leaves no output; the rerun reports those tasks complete, skips them,
    and writes the bytes an uninterrupted prepare writes; catches a rerun starting from zero or mixing a partial
    task file into the shards."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pretrain.cli", "prepare", "--dataset", "builtin:shakespeare", "--tokenizer",
           str(bpe_tokenizer_dir), "--out", str(out), "--workers", "1", "--num-proc", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POLAR_LOG": str(tmp_path / "polar.log")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    completions = work_dir(out) / "logs" / "completions"
    deadline = time.monotonic() + 300
    while not (completions.is_dir() and len(os.listdir(completions)) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = len(os.listdir(completions))
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reported = int(rerun.stdout.split("worker(s); ")[1].split(" were complete")[0])
    assert 3 <= done <= reported < 38
    assert not work_dir(out).exists()
    prepare(PrepareConfig("builtin:shakespeare", str(bpe_tokenizer_dir), str(tmp_path / "straight"), workers=2))
    assert dir_digest(out) == dir_digest(tmp_path / "straight")
