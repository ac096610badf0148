"""Evaluation results are kept where the model card looks for them: `polar eval niah` and `polar eval sweep`
write timestamped files into RUN/eval/step-N/ that record the checkpoint step, and never overwrite."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["tests.eval_fixtures"]
pytest.importorskip("lm_eval")

NIAH = ["--lengths", "48", "--depths", "0,100", "--samples", "1", "--digits", "1", "--distractors", "3",
        "--needle", "#{value}.", "--question", "\\n#"]


def test_eval_niah_twice_keeps_both_results(tiny_run, capsys):
    from pretrain.cli import main

    folder = tiny_run / "eval" / "step-5"
    before = set(folder.glob("niah_*"))  # the run fixture is shared: count only this test's files
    for step in ([], ["--step", "5"]):
        assert main(["eval", "niah", str(tiny_run), *step, *NIAH]) == 0
    new = set(folder.glob("niah_*")) - before
    results = sorted(p for p in new if p.suffix == ".json")
    assert len(results) == 2 and len([p for p in new if p.suffix == ".png"]) == 2
    for path in results:
        data = json.loads(path.read_text())
        assert data["checkpoint_step"] == 5 and data["date"] > 0 and len(data["cells"]) == 2
    assert "rank-1" in capsys.readouterr().out


@pytest.mark.slow
def test_sweep_writes_each_step_into_its_eval_folder_and_prints_the_table(tiny_run, offline_tasks,
                                                                         offline_task_index, tmp_path, capsys):
    from pretrain.cli import main

    lm = f"--tasks polar_lastword --limit 2 --device cpu --include_path {offline_tasks}"
    assert main(["eval", "sweep", str(tiny_run), "--lm", lm, "--niah", " ".join(NIAH).replace("\\n", "\\\\n"),
                 "--out", str(tmp_path / "sweep")]) == 0
    for step in (3, 5):
        folder = tiny_run / "eval" / f"step-{step}"
        lm_file = max(folder.glob("lm_*.json"))
        assert json.loads(lm_file.read_text())["config"]["checkpoint_step"] == step
        assert json.loads((folder / "sweep-lm.json").read_text())["args"] == lm
        assert (folder / "sweep-niah.json").is_file()
    out = capsys.readouterr().out
    assert "| run | step |" in out and "polar_lastword/perplexity" in out and "| run | 3 |" in out
