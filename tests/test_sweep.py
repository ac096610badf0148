"""`polar eval sweep`: picks every K-th checkpoint (and the latest), stores one result per (run, step, eval),
resumes an interrupted sweep by computing only what is missing, and writes the combined table and plots."""

from __future__ import annotations

import json

import pytest

from eval import sweep as sw
from eval.registry import get
from pretrain import checkpoint as ckpt

NIAH, LM = "--lengths 64,128 --depths 0,100 --samples 1", "--tasks polar_offline --limit 2"


def fake_run(root, name, steps):
    """A run directory whose checkpoints/ lists ``steps`` (the sweep only reads the tags; evaluators are stubbed)."""
    run = root / name
    for s in steps:
        (run / "checkpoints" / ckpt.tag_for(s)).mkdir(parents=True)
        (run / "checkpoints" / ckpt.tag_for(s) / ckpt.STATE_FILE).write_text("{}")
    return run


def fake_result(name, step):
    if name == "lm":
        return {"results": {"polar_nextline": {"acc,none": step / 100, "acc_stderr,none": 0.1}}}
    return {"cells": [{"length": n, "depth": d, "exact_match": 0.0, "rank1": min(1.0, step / n), "chance_rank1": 0.1}
                      for n in (64, 128) for d in (0, 100)]}


@pytest.fixture
def calls(monkeypatch):
    done = []

    def make(name):
        def evaluate(run, step, argv):
            if len(done) == calls.fail_after:
                raise KeyboardInterrupt  # the sweep is killed here
            done.append((run.name, step, name))
            return fake_result(name, step)
        return evaluate

    calls = type("Calls", (), {"done": done, "fail_after": None})
    evaluators = {"lm": make("lm"), "niah": make("niah")}
    monkeypatch.setattr(sw, "evaluate", lambda name, run, step, argv: evaluators[name](run, step, argv))
    return calls


def test_every_kth_step_and_the_latest(tmp_path):
    run = fake_run(tmp_path, "r", [10, 20, 30, 40, 50])
    assert sw.checkpoint_steps(run, 2) == [10, 30, 50]
    assert sw.checkpoint_steps(run, 3) == [10, 40, 50]
    assert sw.checkpoint_steps(run, 2, latest_only=True) == [50]


def test_latest_evaluates_only_the_latest_and_keeps_stored_results(tmp_path, calls):
    """`--latest`: only each run's latest checkpoint is evaluated; results stored for other steps before stay
    in the table."""
    runs = [fake_run(tmp_path, name, [10, 20, 30]) for name in ("a", "b")]
    sw.sweep(runs[:1], 1, {"niah": "--samples 1"}, out=tmp_path / "sweep", progress=False)
    before = len(calls.done)
    table = sw.sweep(runs, 1, {"niah": "--samples 1"}, out=tmp_path / "sweep", progress=False, latest_only=True)
    assert calls.done[before:] == [("b", 30, "niah")]
    assert sum(line.startswith("| a ") for line in table.read_text().splitlines()) == 3


def test_interrupted_sweep_resumes_with_only_the_missing_results(tmp_path, calls):
    runs = [fake_run(tmp_path, "base", [10, 20, 30]), fake_run(tmp_path, "polar", [10, 20, 30])]
    calls.fail_after = 5
    with pytest.raises(KeyboardInterrupt):
        sw.sweep(runs, 1, {"lm": LM, "niah": NIAH}, out=tmp_path / "out", progress=False)
    first = list(calls.done)
    assert len(first) == 5
    calls.fail_after, calls.done[:] = None, []
    table = sw.sweep(runs, 1, {"lm": LM, "niah": NIAH}, out=tmp_path / "out", progress=False)
    assert len(calls.done) == 12 - 5 and not set(calls.done) & set(first)
    calls.done[:] = []
    sw.sweep(runs, 1, {"lm": LM, "niah": NIAH}, out=tmp_path / "out", progress=False)  # all there: nothing to do
    assert calls.done == []
    new_args = {"lm": LM, "niah": NIAH + " --seed 1"}
    sw.sweep(runs, 1, new_args, out=tmp_path / "out", progress=False)  # new args: recompute
    assert len(calls.done) == 6 and {n for *_, n in calls.done} == {"niah"}
    stored = json.loads(sw.result_path(runs[0], 20, "lm").read_text())
    assert stored["args"] == LM and stored["result"] == fake_result("lm", 20)
    text = table.read_text()
    assert "| base | 30 |" in text and "| polar | 10 |" in text and "polar_nextline/acc" in text
    for name in ("sweep.csv", "sweep_metrics.png", "sweep_niah.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0


def test_bad_eval_arguments_fail_before_any_work(tmp_path, calls):
    run = fake_run(tmp_path, "r", [1])
    with pytest.raises(SystemExit):
        sw.sweep([run], 1, {"niah": "--lenghts 1k"}, out=tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="distractors"):
        sw.sweep([run], 1, {"niah": "--digits 1 --distractors 9"}, out=tmp_path / "out", progress=False)
    assert calls.done == []


def test_shards_partition_the_work_and_a_combine_adds_nothing(tmp_path, calls):
    """The SLURM array: N shards together evaluate every job exactly once; the combine step only tabulates."""
    runs = [fake_run(tmp_path, "base", [10, 20, 30]), fake_run(tmp_path, "polar", [10, 20])]
    per_shard = []
    for i in range(3):
        calls.done[:] = []
        assert sw.sweep(runs, 1, {"lm": LM, "niah": NIAH}, progress=False, shard=(i, 3)) is None
        per_shard.append(list(calls.done))
    everything = [j for s in per_shard for j in s]
    assert len(everything) == len(set(everything)) == 10
    calls.done[:] = []
    assert sw.sweep(runs, 1, {"lm": LM, "niah": NIAH}, out=tmp_path / "out", progress=False).is_file()
    assert calls.done == []


def test_summaries_carry_standard_errors(rng):
    """lm-eval's stderr passes through; NIAH accuracies get the binomial stderr over all prompts of the cells."""

    lm = get("lm").summarize({"results": {"t": {"alias": "t", "sample_len": 9, "acc,none": 0.25,
                                                "acc_stderr,none": 0.05, "ppl,none": 3.0, "ppl_stderr,none": "N/A"}}})
    assert lm == {"t/acc": (0.25, 0.05), "t/ppl": (3.0, None)}
    samples = rng.randint(1, 8)
    cells = [{"length": n, "depth": d, "exact_match": rng.randint(0, samples) / samples,
              "rank1": rng.randint(0, samples) / samples, "chance_rank1": 0.1} for n in (64, 128) for d in (0, 50, 100)]
    niah = get("niah").summarize({"config": {"samples": samples}, "cells": cells})
    hits = [c["rank1"] * samples for c in cells if c["length"] == 64]
    p = sum(hits) / (3 * samples)
    assert niah["niah/rank1@64"][0] == pytest.approx(p)
    assert niah["niah/rank1@64"][1] == pytest.approx((p * (1 - p) / (3 * samples)) ** 0.5)
