"""`polar study depth`: the grid holds counted parameters within tolerance (recounted on real models); failed
cells are reported without stopping the others; a two-cell study runs end to end on CPU, resumes a killed
cell from its checkpoint, skips finished cells, and writes the combined table and plot; the same study runs
as a SLURM job array on the local cluster."""

from __future__ import annotations

import json

import pytest
import yaml

from eval.study import expand_grid, load_study_config
from models import build_model
from models.typed_config import ConfigError
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.metrics import read_jsonl
from tests.test_slurm import cluster  # noqa: F401  (the local SLURM cluster fixture)
from tests.train_helpers import fault_env, write_config


def study_config(tmp_path, data, **study) -> str:
    base = write_config(tmp_path, data, checkpoint={"every": 100, "keep_last": 1})
    cfg = {
        "study": {"name": "s", "out_dir": str(tmp_path / "studies"), "base": str(base), "depths": [1, 2],
                  "seq_lens": [32], "variants": {"polarized": {}}, "param_tolerance": 0.05, **study},
        "eval": {"context_lengths": [16], "windows": 4, "batch_size": 4,
                 "evals": {"niah": "--lengths 40 --depths 0,100 --samples 1 --digits 1 --distractors 2 "
                                   "--needle '#{value}.' --question '\\n#'"}},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_grid_holds_counted_params_within_tolerance(tmp_path, data):
    cfg = load_study_config(study_config(tmp_path, data, depths=[1, 4], seq_lens=[16, 32],
                                         variants={"baseline": {"polarize.ones": 0, "polarize.zeros": 0},
                                                   "polarized": {}}))
    cells = expand_grid(cfg)
    assert len(cells) == 2 * 2 * 2
    base = load_config(cfg.study.base)
    target = sum(p.numel() for p in build_model(base.model).parameters())
    for c in cells:
        run = load_config(cfg.study.base, c.overrides)
        counted = sum(p.numel() for p in build_model(run.model).parameters())  # real weights, not meta
        assert counted == c.params and abs(counted / target - 1) <= 0.05
        assert run.model.n_layer == c.depth and run.data.seq_len == c.seq_len
        assert run.data.global_batch_size * run.data.seq_len == base.data.global_batch_size * base.data.seq_len
    assert len({c.d_model for c in cells if c.variant == "polarized"}) > 1  # depth really trades width
    with pytest.raises(ConfigError, match="tolerance"):
        expand_grid(load_study_config(study_config(tmp_path, data, depths=[1, 8], param_tolerance=0.001)))


def test_failed_cells_are_reported_and_the_others_still_run(tmp_path, data, monkeypatch, capsys):
    import eval.study as study

    cfg = load_study_config(study_config(tmp_path, data))
    tried = []
    monkeypatch.setattr(study, "train_cell", lambda cfg, cell, log: tried.append(cell.name) or False)
    assert study.run_study(cfg, expand_grid(cfg)) == ["polarized-L1-s32", "polarized-L2-s32"]
    assert tried == ["polarized-L1-s32", "polarized-L2-s32"] and capsys.readouterr().out.count("FAILED") == 2
    assert not (cfg.study.dir / "study.md").exists()  # nothing to combine yet


@pytest.mark.slow
def test_two_cell_study_resumes_a_killed_cell_and_combines(tmp_path, data, capsys, monkeypatch):
    cfg = study_config(tmp_path, data)
    study = tmp_path / "studies" / "s"
    # cell 0 is killed at step 3 (it checkpoints and exits 75); with no retries it is reported as failed
    with monkeypatch.context() as faults:
        for k, v in fault_env(signal_at_step=3).items():
            faults.setenv(k, v)
        assert main(["study", "depth", cfg, "--cell", "0", "--study.retries", "0"]) == 1
    assert "polarized-L1-s32: FAILED" in capsys.readouterr().out

    assert main(["study", "depth", cfg]) == 0  # resumes cell 0 from step 3, trains cell 1, combines
    for cell in ("polarized-L1-s32", "polarized-L2-s32"):
        steps = [r["step"] for r in read_jsonl(study / "runs" / cell / "metrics.jsonl") if r["kind"] == "train"]
        assert steps == list(range(1, 9))  # every step exactly once
    assert "resumed from" in (study / "logs" / "polarized-L1-s32.log").read_text()
    result = json.loads((study / "study.json").read_text())
    assert [(r["depth"], sorted(r["loss"])) for r in result["cells"]] == [(1, ["16", "32"]), (2, ["16", "32"])]
    assert all(0 <= r["scores"]["niah/rank1"][0] <= 1 for r in result["cells"]) and result["missing"] == []
    assert len((study / "study.md").read_text().splitlines()) == 4 and (study / "study.png").stat().st_size > 0

    logs = {p.name: p.stat().st_size for p in (study / "logs").iterdir()}
    capsys.readouterr()
    assert main(["study", "depth", cfg]) == 0  # finished cells are skipped
    assert capsys.readouterr().out.count(": done") == 2
    assert {p.name: p.stat().st_size for p in (study / "logs").iterdir()} == logs


def test_plan_prints_the_grid_and_runs_nothing(tmp_path, data, capsys):
    cfg = study_config(tmp_path, data)
    assert main(["study", "depth", cfg, "--plan", "--depths", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "polarized-L4-s32" in out and "target" in out and not (tmp_path / "studies").exists()
    assert main(["study", "depth", cfg, "--depths", "1,x"]) == 2


@pytest.mark.slurm
@pytest.mark.slow
def test_study_runs_as_a_slurm_job_array(cluster, tmp_path, data):  # noqa: F811 (the imported fixture)
    from tests.test_slurm import polar, wait_for

    cfg = study_config(tmp_path, data)
    out = polar("study", "depth", cfg, "--slurm", "--submit", env=cluster.env)
    assert out.returncode == 0, out.stderr
    array, combine = out.stdout.split("submitted array job ")[1].split(" (")[0], out.stdout.split()[-1]
    assert wait_for(cluster, combine, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600) == "COMPLETED", cluster.logs()
    study = tmp_path / "studies" / "s"
    logs = "".join(p.read_text() for p in (study / "logs").glob("slurm-*.out"))
    assert f"slurm-{array}_0.out" in {p.name for p in (study / "logs").iterdir()} and "study task 1" in logs
    result = json.loads((study / "study.json").read_text())
    assert sorted(r["cell"] for r in result["cells"]) == ["polarized-L1-s32", "polarized-L2-s32"]
    assert (study / "study.png").stat().st_size > 0
