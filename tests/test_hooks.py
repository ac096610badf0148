"""Trainer hooks: the loop's callback contract (order, the first Stop ends a step, on_fit_end on every exit), the
plugin loader, hooks from outside the package steering a real run, the built-ins' order as a crash-safety
guarantee, and DeepSpeed's output kept off the terminal."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from models.plugins import load_plugins
from pretrain import checkpoint as ckpt
from pretrain import hooks
from pretrain.cli import main
from pretrain.console import output_to_log
from pretrain.hooks import FINISHED, Callback, Stop
from pretrain.metrics import read_jsonl
from pretrain.trainer import Trainer, TrainState
from tests.train_helpers import ROOT, fault_env, losses, ok, train, write_config


class Recorder(Callback):
    def __init__(self, name: str, events: list, stop_at: int | None = None):
        self.name, self.events, self.stop_at = name, events, stop_at

    def on_fit_start(self, trainer):
        self.events.append((self.name, "start"))

    def on_step_end(self, trainer, record):
        self.events.append((self.name, record["step"]))
        return Stop(42, "stopped", "stopped by a test", save=False) if record["step"] == self.stop_at else None

    def on_fit_end(self, trainer, stop):
        self.events.append((self.name, "end", stop))


def loop(callbacks: list[Callback], steps: int, fail_at: int | None = None) -> SimpleNamespace:
    """What Trainer.fit uses: callbacks, state, the budget, a step, print and write_status."""
    state = TrainState()

    def step():
        if state.step + 1 == fail_at:
            raise RuntimeError("the step failed")
        state.step += 1
        return {"kind": "train", "step": state.step, "loss": 1.0}

    printed, status = [], []
    return SimpleNamespace(callbacks=callbacks, state=state, budget=SimpleNamespace(steps=steps), step=step,
                           print=printed.append, write_status=status.append, printed=printed, status=status)


def test_callbacks_see_every_event_in_order_until_the_budget():
    """An ordering bug in the loop (a callback skipped, called twice, or out of list order; on_fit_end before the
    last step) would show here as a different event list."""
    events = []
    trainer = loop([Recorder("a", events), Recorder("b", events)], steps=2)
    assert Trainer.fit(trainer) == 0
    assert events == [("a", "start"), ("b", "start"), ("a", 1), ("b", 1), ("a", 2), ("b", 2),
                      ("a", "end", FINISHED), ("b", "end", FINISHED)]
    assert trainer.status == ["finished"] and trainer.state.step == 2


def test_the_first_stop_ends_the_step_and_the_run():
    """A loop that kept calling later callbacks after a Stop (the interval checkpoint after preemption already
    decided to save at the end) or kept stepping would show extra events; a lost Stop would exit 0."""
    events = []
    trainer = loop([Recorder("a", events, stop_at=2), Recorder("b", events)], steps=5)
    assert Trainer.fit(trainer) == 42
    stop = Stop(42, "stopped", "stopped by a test", save=False)
    assert events == [("a", "start"), ("b", "start"), ("a", 1), ("b", 1), ("a", 2), ("a", "end", stop),
                      ("b", "end", stop)]
    assert trainer.printed == ["stopped by a test"] and trainer.status == ["stopped"] and trainer.state.step == 2


def test_a_failing_step_still_ends_every_callback_and_writes_no_status():
    """A loop without cleanup on errors would leave a progress bar open over the error line; one that passed
    the previous Stop, or FINISHED, would let the checkpoint callback save after a failure."""
    events = []
    trainer = loop([Recorder("a", events), Recorder("b", events)], steps=5, fail_at=2)
    with pytest.raises(RuntimeError, match="the step failed"):
        Trainer.fit(trainer)
    assert events[-2:] == [("a", "end", None), ("b", "end", None)] and trainer.status == []


def test_plugins_register_callbacks_and_a_bad_name_is_one_line(tmp_path, monkeypatch, capsys):
    """A loader that ignored $POLAR_PLUGINS would run faultless tests that pass for the wrong reason; one that let
    an ImportError escape would print a traceback instead of naming the plugin."""
    (tmp_path / "my_plugin.py").write_text(textwrap.dedent("""
        from pretrain.hooks import Callback, register_callback

        @register_callback
        class Mine(Callback):
            pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(hooks, "_registered", [])
    monkeypatch.setenv("POLAR_PLUGINS", " my_plugin ,")
    assert load_plugins() == ["my_plugin"]
    assert [type(c).__name__ for c in hooks.registered_callbacks()] == ["Mine"]
    monkeypatch.setenv("POLAR_PLUGINS", "no_such_plugin")
    assert main(["info"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "$POLAR_PLUGINS: cannot import plugin 'no_such_plugin'" in err[0], err


def test_an_old_config_with_a_debug_section_is_refused_in_one_line(tmp_path, data, capsys):
    """The removed debug.* switches must not be silently ignored (a test relying on one would pass without its
    fault): the key is named, in one line."""
    cfg = write_config(tmp_path, data, debug={"signal_at_step": 3})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'debug'" in err[0], err


def test_printed_output_goes_to_the_log_as_lines(caplog, capsys):
    """A writer that logged each write() call, or every carriage-return redraw of a progress bar, would flood the
    log; one that kept the partial last line would lose it."""
    with caplog.at_level(logging.INFO, logger="deepspeed"), output_to_log("deepspeed"):
        print("Processing zero checkpoint 'x'")
        print("Loading: 0%\rLoading: 50%\rLoading: 100%", file=sys.stderr)
        sys.stdout.write("no newline")
    assert capsys.readouterr() == ("", "")
    assert [r.getMessage() for r in caplog.records] == ["Processing zero checkpoint 'x'", "Loading: 100%",
                                                         "no newline"]


@pytest.mark.slow
def test_a_hook_from_a_plugin_stops_the_run_with_its_code_and_checkpoint(tmp_path, data):
    """A hook outside the package steers a real run with no production switch: its Stop sets the exit code,
    status.json and the final checkpoint. A loop that ignored registered callbacks would train all 8 steps."""
    (tmp_path / "stop_plugin.py").write_text(textwrap.dedent("""
        from pretrain.hooks import Callback, Stop, register_callback

        @register_callback
        class StopAtTwo(Callback):
            def on_step_end(self, trainer, record):
                return Stop(42, "stopped", "stopped by a plugin") if trainer.state.step == 2 else None
    """))
    cfg = write_config(tmp_path, data)
    env = {"POLAR_PLUGINS": "stop_plugin", "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    out = ok(train(cfg, env=env), 42)
    run_dir = tmp_path / "runs" / "run"
    assert "stopped by a plugin" in out.stdout
    assert [s for s, _ in losses(run_dir)] == [1, 2]
    assert ckpt.latest_tag(run_dir / "checkpoints") == "step_00000002"
    assert (run_dir / "status.json").read_text() == '{"state": "stopped", "step": 2}'


@pytest.mark.slow
def test_a_kill_right_after_a_checkpoint_loses_no_metrics_or_validation_line(tmp_path, data):
    """The built-ins write a step's metrics and validation lines before its checkpoint. A hook order bug that
    saved first would lose step 4's lines to a crash right after the save: the resumed run starts at step 5,
    so metrics.jsonl would miss train or val step 4 (while the losses would still look fine)."""
    cfg = write_config(tmp_path, data, schedule={"steps": 6}, checkpoint={"every": 2}, eval={"every": 2})
    run_dir = tmp_path / "runs" / "run"
    killed = train(cfg, env=fault_env(kill_after_save_at_step=4))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert ckpt.latest_tag(run_dir / "checkpoints") == "step_00000004"
    ok(train(cfg))
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4, 6]


@pytest.mark.slow
def test_reading_a_run_folder_prints_nothing_of_deepspeed(tmp_path, data):
    """`polar export` of a ZeRO checkpoint: DeepSpeed's accelerator warning, zero_to_fp32's progress lines and
    its tqdm bar used to reach the terminal; they belong in $POLAR_LOG (eval and publish read checkpoints
    through the same consolidated_state_dict)."""
    cfg = write_config(tmp_path, data, schedule={"steps": 2}, distributed={"zero_stage": 2})
    ok(train(cfg))
    log_file = tmp_path / "polar.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "POLAR_LOG": str(log_file)}
    env.pop("DS_ACCELERATOR", None)
    out = subprocess.run([sys.executable, "-m", "pretrain.cli", "export", str(tmp_path / "runs" / "run"), "--out",
                          str(tmp_path / "export")], env=env, capture_output=True, text=True, timeout=600)
    ok(out)
    assert out.stdout.strip().splitlines() == [out.stdout.strip()] and out.stdout.startswith("exported "), out.stdout
    assert out.stderr == "", out.stderr
    log = log_file.read_text()
    assert "Processing zero checkpoint" in log and "Reconstructed fp32 state dict" in log, log[-3000:]
