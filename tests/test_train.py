"""Training engine end to end: ZeRO stages and precisions learn, resume is bitwise, resizes continue the
data, checkpoints rotate, bad resumes are refused, the non-finite guard works, export matches transformers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from pretrain import checkpoint as ckpt
from pretrain.callbacks import EXIT_NONFINITE
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.metrics import read_jsonl
from tests.train_helpers import fault_env, losses, ok, preempted, train, tree_hash, write_config

pytestmark = pytest.mark.slow


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_loss_falls_under_zero(tmp_path, data, stage, dtype):
    cfg = write_config(tmp_path, data, schedule={"steps": 14, "warmup_steps": 2}, optim={"lr": 1e-2},
                       distributed={"zero_stage": stage}, precision={"dtype": dtype})
    out = ok(train(cfg, 2))
    assert "world 2" in out.stdout and f"ZeRO-{stage}" in out.stdout
    hist = [float.fromhex(h) for _, h in losses(tmp_path / "runs" / "run")]
    assert len(hist) == 14
    assert sum(hist[-3:]) / 3 < hist[0] - 0.4, hist  # from ~ln(512) = 6.2


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [2, 3])
def test_resume_after_sigterm_is_bitwise(tmp_path, data, stage):
    # 2 processes x micro 4 x grad accum 2 = global 16
    common = dict(distributed={"zero_stage": stage}, precision={"dtype": "bf16"}, eval={"every": 3})
    full = write_config(tmp_path, data, name="full", **common)
    split = write_config(tmp_path, data, name="split", **common)
    ok(train(full, 2))
    first = preempted(train(split, 2, env=fault_env(signal_at_step=3)), 2)
    assert "checkpointed at step 4" in first.stdout  # the signal lands during step 4; everyone stops after it
    assert ckpt.latest_tag(tmp_path / "runs" / "split" / "checkpoints") == "step_00000004"
    second = ok(train(split, 2))
    assert "resumed from" in second.stdout
    expected = losses(tmp_path / "runs" / "full")
    assert [s for s, _ in expected] == list(range(1, 9))
    assert losses(tmp_path / "runs" / "split") == expected  # every step once, identical float bits
    vals = [r["step"] for r in read_jsonl(tmp_path / "runs" / "split" / "metrics.jsonl") if r["kind"] == "val"]
    assert vals == [3, 6, 8]


@pytest.mark.distributed
def test_resume_with_fewer_processes_continues_the_data(tmp_path, data):
    full = write_config(tmp_path, data, name="full")
    split = write_config(tmp_path, data, name="split")
    ok(train(full, 2))
    preempted(train(split, 2, env=fault_env(signal_at_step=3)), 2)
    out = ok(train(split, 1))  # same global batch: grad accumulation 2 -> 4
    assert "world 1, grad accum 4" in out.stdout
    a = [r for r in read_jsonl(tmp_path / "runs" / "full" / "metrics.jsonl") if r["kind"] == "train"]
    b = [r for r in read_jsonl(tmp_path / "runs" / "split" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["consumed_samples"] for r in b] == [16 * s for s in range(1, 9)]
    # same samples in the same order: the losses agree up to the reduction order of another world size
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-3, (ra, rb)


def test_checkpoints_rotate_and_a_finished_run_reports(tmp_path, data):
    cfg = write_config(tmp_path, data, schedule={"steps": 7}, checkpoint={"every": 2, "keep_last": 2},
                       distributed={"zero_stage": 0})
    ok(train(cfg))
    ckpt_dir = tmp_path / "runs" / "run" / "checkpoints"
    assert ckpt.list_tags(ckpt_dir) == ["step_00000006", "step_00000007"]
    assert ckpt.latest_tag(ckpt_dir) == "step_00000007"
    saved = yaml.safe_load((tmp_path / "runs" / "run" / "config.yaml").read_text())
    assert saved["model"]["d_model"] == 32 and "preset" not in saved["model"]
    before = losses(tmp_path / "runs" / "run")
    again = ok(train(cfg))
    assert "run already finished at step 7 of 7" in again.stdout
    assert "params," not in again.stdout  # reported from the files: no engine built, no wandb run opened
    assert losses(tmp_path / "runs" / "run") == before


def test_incompatible_resume_is_refused_and_changes_nothing(tmp_path, data):
    cfg = write_config(tmp_path, data, schedule={"steps": 3}, distributed={"zero_stage": 1})
    ok(train(cfg))
    run_dir = tmp_path / "runs" / "run"
    before = tree_hash(run_dir)
    bad = train(cfg, 1, "--model.n_layer", "3")
    assert bad.returncode == 2
    err = bad.stderr.strip().splitlines()[-1]
    assert "different model config (model.n_layer: 2 in the checkpoint vs 3 now)" in err
    assert tree_hash(run_dir) == before


def test_a_changed_recipe_on_resume_is_recorded(tmp_path, data):
    """Catches a resume that changes the batch or the schedule silently: one console line per change, an entry
    per change in config.yaml's history and a config record in the metrics at the resumed step; the recorded
    config.yaml still loads as the new recipe."""
    cfg = write_config(tmp_path, data, schedule={"steps": 2}, checkpoint={"every": 2})
    ok(train(cfg))
    out = ok(train(cfg, 1, "--data.global_batch_size", "32", "--schedule.steps", "3"))
    changes = [("data.global_batch_size", 16, 32), ("schedule.steps", 2, 3)]
    assert [line for line in out.stdout.splitlines() if line.startswith("resumed with")] == [
        f"resumed with {k} changed from {was} to {now} (from step 3)" for k, was, now in changes]
    run_dir = tmp_path / "runs" / "run"
    expected = [{"step": 2, "key": k, "was": was, "now": now} for k, was, now in changes]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["history"] == expected
    assert load_config(run_dir / "config.yaml").data.global_batch_size == 32
    records = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] != "val"]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("config", 2), ("config", 2),
                                                        ("train", 3)]
    assert [{k: r[k] for k in ("step", "key", "was", "now")} for r in records[2:4]] == expected
    assert records[4]["tokens_seen"] - records[1]["tokens_seen"] == 32 * 32


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, data):
    cfg = write_config(tmp_path, data, schedule={"steps": 6}, checkpoint={"every": 2})
    ok(train(cfg, env=fault_env(nonfinite_steps=[3])))
    recs = [r for r in read_jsonl(tmp_path / "runs" / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["nonfinite_skipped"] for r in recs] == [0, 0, 1, 1, 1, 1]
    assert [r["loss"] is None for r in recs] == [False, False, True, False, False, False]

    cfg = write_config(tmp_path, data, name="diverge", schedule={"steps": 8}, checkpoint={"every": 2},
                       logging={"max_nonfinite_steps": 2})
    out = train(cfg, env=fault_env(nonfinite_steps=[3, 4]))
    assert out.returncode == EXIT_NONFINITE, out.stderr[-2000:]
    assert "2 non-finite steps in a row at step 4" in out.stdout
    assert ckpt.latest_tag(tmp_path / "runs" / "diverge" / "checkpoints") == "step_00000002"


def test_skipped_step_leaves_parameters_unchanged(tmp_path, data):
    """Run to step 2 and checkpoint; a run whose step 3 is non-finite must equal step-2 weights after step 3."""
    from pretrain.export import load_model

    cfg = write_config(tmp_path, data, schedule={"steps": 3}, checkpoint={"every": 2}, distributed={"zero_stage": 0})
    ok(train(cfg, env=fault_env(nonfinite_steps=[3])))
    run_dir = tmp_path / "runs" / "run"
    at2, at3 = load_model(run_dir, step=2).state_dict(), load_model(run_dir, step=3).state_dict()
    for k in at2:
        assert torch.equal(at2[k], at3[k]), k


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"optim.lrr": 1.0}, "unknown config key 'optim.lrr': did you mean 'lr'"),
        ({"distributed.zero_stage": 4}, "zero_stage must be >= 0 and <= 3"),
        ({"model.preset": "mamba-13m"}, "did you mean 'mamba-130m'"),
        ({"precision.dtype": "fp16"}, "is not one of"),
    ],
)
def test_config_validation_errors(tmp_path, data, overrides, message):
    from models.typed_config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, data), overrides)


def test_cli_reports_bad_config_in_one_line(tmp_path, data, capsys):
    cfg = write_config(tmp_path, data)
    assert main(["train", str(cfg), "--optim.lrr", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "did you mean 'lr'" in err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_global_batch_must_divide(tmp_path, data):
    cfg = write_config(tmp_path, data, data={"global_batch_size": 10})
    out = train(cfg)
    assert out.returncode == 2
    assert "not a multiple of micro_batch_size x processes" in out.stderr


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 3])
def test_export_loads_in_transformers_with_our_logits(tmp_path, data, stage):
    from transformers import MambaForCausalLM

    from pretrain.export import load_model

    nproc = 2 if stage else 1
    cfg = write_config(tmp_path, data, schedule={"steps": 3}, distributed={"zero_stage": stage},
                       data={"global_batch_size": 8 * nproc})
    ok(train(cfg, nproc))
    run_dir = tmp_path / "runs" / "run"
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "tokenizer.model").is_file()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 2  # no silent overwrite
    ours = load_model(run_dir).eval()
    theirs = MambaForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)
    # the exported weights are the trained ones, not the init
    state = ckpt.read_state(run_dir / "checkpoints", "step_00000003")
    assert state["step"] == 3 and state["config"]["distributed"]["zero_stage"] == stage


def test_wandb_offline_and_metrics_complete_after_resume(tmp_path, data):
    cfg = write_config(tmp_path, data, schedule={"steps": 5}, logging={"wandb": "offline"})
    preempted(train(cfg, env=fault_env(signal_at_step=2)))
    ok(train(cfg))
    run_dir = tmp_path / "runs" / "run"
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4, 5]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert runs, list(run_dir.rglob("*"))[:20]
    run_id = (run_dir / "wandb_id").read_text()
    assert all(r.name.endswith(run_id) for r in runs)  # the resumed run continues the same wandb run


def test_metrics_jsonl_drops_steps_past_the_checkpoint(tmp_path, data):
    """A crash after the last checkpoint leaves extra lines; the resumed run rewrites them once."""
    cfg = write_config(tmp_path, data, schedule={"steps": 6}, checkpoint={"every": 2})
    preempted(train(cfg, env=fault_env(signal_at_step=3)))
    run_dir = tmp_path / "runs" / "run"
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    # simulate a hard crash: roll `latest` back to step 2 while step 3's metrics are already written
    (run_dir / "checkpoints" / "latest").write_text("step_00000002")
    assert json.loads(lines[-1])["step"] == 4
    ok(train(cfg))
    assert [s for s, _ in losses(run_dir)] == [1, 2, 3, 4, 5, 6]
