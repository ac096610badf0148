"""The evaluation registry (eval/registry.py): an evaluation registered from outside the project (this file,
through POLAR_PLUGINS) goes through `polar eval`, the sweep, its SLURM script and the model card without any
project file naming it; every reproduce command of a card runs as written and writes the result it shows;
the card shows every kept configuration, labelled; help texts state our defaults."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.registry import Evaluation, Score, evaluations, get, register
from tests.train_helpers import ROOT, shell_env

pytest_plugins = ["tests.eval_fixtures"]
PLUGIN = __name__  # this module, as POLAR_PLUGINS names it


class TokenCount(Evaluation):
    """A trivial evaluation: how many tokens a text has and the model's mean logit on it."""

    name = "token_count"
    help = "tokens of a text and the model's mean logit on it (a test plugin)"
    description = "Count the tokens of --text and average the model's logits over them."

    def add_options(self, p) -> None:
        p.add_argument("--text", default="To be, or not to be", help="the text (default: Hamlet's question)")

    def run(self, model, tok, settings, args, progress: bool) -> dict:
        ids = tok.encode(args.text)
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=next(model.parameters()).device)).logits
        return {"tokens": len(ids), "mean_logit": float(logits.float().mean())}

    def summarize(self, result: dict) -> dict[str, Score]:
        return {"token_count/tokens": Score(result["tokens"]), "token_count/mean_logit": Score(result["mean_logit"])}


register(TokenCount())

NIAH_SHORT = ["--lengths", "48", "--depths", "0,100", "--samples", "1", "--digits", "1", "--distractors", "3",
              "--needle", "#{value}.", "--question", "\\n#"]
NIAH_RULER = ["--lengths", "160", "--depths", "50", "--samples", "1", "--distractors", "2"]
RECENCY = ["--context", "24", "--target", "8", "--sizes", "4/24", "--positions", "3", "--windows", "4",
           "--data", "builtin"]
LM = ["--tasks", "polar_lastword", "--limit", "2", "--device", "cpu"]
RULER = ["--tasks", "niah_single_1,ruler_vt", "--lengths", "400", "--depths", "50", "--samples", "1", "--max-new", "4"]
PASSKEY = ["--lengths", "200", "--depths", "0,100", "--samples", "1", "--max-new", "3"]
POSITION_LOSS = ["--length", "128", "--windows", "1", "--train-length", "32"]


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A copy of the checkpoints at steps 3 and 5 (the shared run's eval folders hold other tests' results)."""
    shutil.copytree(tiny_run / "checkpoints", tmp_path / "run" / "checkpoints")
    return tmp_path / "run"


def card_of(run: Path, step: int) -> str:
    """The model card of ``step`` as `polar publish` renders it, with the results kept under RUN/eval/step-N."""
    from eval.results import read_step_results
    from models.typed_config import to_dict
    from pretrain import checkpoint as ckpt
    from pretrain.config import build_config
    from pretrain.model_card import render_card

    state = ckpt.read_state(run / "checkpoints", ckpt.tag_for(step))
    data = {"path": str(run / "data"), **state["config"]["data"]}
    cfg = build_config({"model": state["config"]["model"], "data": data, "schedule": {"steps": step}})
    results = read_step_results(run / "eval" / f"step-{step}", step)
    return render_card("org/tiny", {"config": to_dict(cfg), "step": step}, run, 1000, results, "apache-2.0", "cpu")


def eval_commands(card: str) -> list[str]:
    """The commands of the card's evaluation block (the fenced bash block of `polar eval` lines)."""
    blocks = re.findall(r"```bash\n(.*?)```", card, re.S)
    (block,) = [b for b in blocks if "polar eval " in b]
    return block.strip().splitlines()


def kept(run: Path, step: int) -> set[Path]:
    return set((run / "eval" / f"step-{step}").glob("*_*.json"))


def test_builtin_kinds_and_help_texts_state_our_defaults(capsys):
    """Catches: `polar eval lm --help` claiming lm-eval's default model (hf) when ours is polar; essay-long
    eval help; an evaluation missing from the registry."""
    from pretrain.cli import main

    builtin = {"lm", "niah", "recency", "ruler", "passkey", "position_loss", "documents"}
    assert builtin | {"token_count"} <= set(evaluations())
    for kind in evaluations().values():
        assert 0 < len(kind.description) < 300, kind.name
    with pytest.raises(SystemExit):
        main(["eval", "lm", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: polar" in text and "(default: hf)" not in text and "polar_offline, are always found" in text


def test_bad_names_are_one_line_errors(monkeypatch, capsys):
    """Catches: a misspelt plugin module or evaluation kind surfacing as a traceback (or silently nothing)."""
    from pretrain.cli import main

    with pytest.raises(ValueError, match="unknown evaluation 'nia'.*niah"):
        get("nia")
    with pytest.raises(ValueError, match="lowercase identifier"):
        register(type("Bad", (TokenCount,), {"name": "out"})())
    monkeypatch.setenv("POLAR_PLUGINS", "no_such_plugin_module")
    assert main(["eval", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no_such_plugin_module" in err


def test_option_tokens_keep_the_settings_as_typed():
    """Catches: a reproduce command that drops a setting, or pins the wrong checkpoint/step/output folder."""
    from eval.options import option_tokens

    tokens = ["runs/x", "--step", "5", "--lengths", "1k", "--out=elsewhere", "--needle", "#{value}."]
    assert option_tokens(tokens, "runs/x") == ["--lengths", "1k", "--needle", "#{value}."]
    assert option_tokens(["--tasks", "t", "--step=3"], None) == ["--tasks", "t"]


@pytest.mark.slow
def test_a_plugin_evaluation_runs_through_sweep_slurm_script_and_card(run, tmp_path):
    """An evaluation registered in this test file reaches a `polar eval sweep` subprocess through
    POLAR_PLUGINS (its column in the table, its result file recording its kind in each step folder), the
    SLURM sweep script (which names no kinds: EVAL_TOKEN_COUNT becomes --token_count), and the card (its
    section and a reproduce command that runs as written). Catches: kinds hard-coded in the sweep, the
    sbatch or the card; a registration that does not reach the sweep's process."""
    env = {**shell_env(), "POLAR_PLUGINS": PLUGIN}
    out = subprocess.run(["polar", "eval", "sweep", str(run), "--token_count", "--text 'Kiss me, Kate'",
                          "--out", str(tmp_path / "sweep")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "token_count/mean_logit" in out.stdout
    assert "token_count/tokens" in (tmp_path / "sweep" / "sweep.md").read_text()
    for step in (3, 5):
        (path,) = (run / "eval" / f"step-{step}").glob("token_count_*.json")
        data = json.loads(path.read_text())
        assert (data["evaluation"], data["options"], data["checkpoint_step"]) == (
            "token_count", ["--text", "Kiss me, Kate"], step)

    script = ROOT / "launch" / "slurm" / "eval_sweep.sbatch"
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, env={
        **env, "RUNS": str(run), "EVAL_TOKEN_COUNT": "--text 'Kiss me'", "COMBINE": "1",
        "POLAR_PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    assert "--token_count --text 'Kiss me'" in out.stdout and "token_count/tokens" in out.stdout

    card = card_of(run, 5)
    assert "`polar eval token_count` on step 5 with `--text 'Kiss me'`" in card  # the newest of each settings
    assert "`polar eval token_count` on step 5 with `--text 'Kiss me, Kate'`" in card
    commands = eval_commands(card)
    public = run.relative_to(run.parents[1])  # the card names the run relative to the folder holding its out_dir
    assert all(c.startswith(f"POLAR_PLUGINS={PLUGIN} polar eval token_count {public} --step 5") for c in commands)
    assert_commands_reproduce(run, 5, commands)


def assert_commands_reproduce(run: Path, step: int, commands: list[str]) -> None:
    """Each command, run by bash from a fresh environment in the folder the card's paths are relative to, exits 0
    and keeps one new result of its kind whose settings and scores are those of the result the card shows
    for it."""
    from eval.results import read_step_results

    shown, cwd = {}, run.parents[1]
    for kind, results in read_step_results(run / "eval" / f"step-{step}", step).items():
        for r in get(kind).shown(results):
            shown[get(kind).reproduce(r, run.relative_to(cwd), step)] = (kind, r)  # each result records its options
    assert set(commands) == set(shown)
    for command in commands:
        kind, original = shown[command]
        before = kept(run, step)
        out = subprocess.run(["bash", "-c", command], cwd=cwd, env=shell_env(), capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, (command, out.stderr[-3000:])
        (new,) = kept(run, step) - before
        data = json.loads(new.read_text())
        assert data["evaluation"] == kind and data["checkpoint_step"] == step, command
        assert data["options"] == original["options"], command
        assert get(kind).summarize(data) == get(kind).summarize(original), command


@pytest.mark.slow
def test_every_reproduce_command_of_a_card_runs_as_written(run, tmp_path, offline_task_index):
    """Results of every built-in kind (lm without any --include_path, two NIAH configurations, recency,
    ruler, passkey, position_loss) go into a card; each NIAH configuration appears with its needle and
    digits, RULER with its summary table; then every reproduce command of the card is run as written from a
    fresh shell. Catches: an lm command that fails with "Tasks not found" (no task generation /
    --include_path), a NIAH section showing only the newest configuration or not saying which needle, a
    command whose settings differ from the result's, a result file without its kind."""
    from pretrain.cli import main

    for kind, options in (("lm", LM), ("niah", NIAH_SHORT), ("niah", NIAH_RULER), ("recency", RECENCY),
                          ("ruler", RULER), ("passkey", PASSKEY), ("position_loss", POSITION_LOSS)):
        assert main(["eval", kind, str(run), "--step", "5", *options]) == 0
    assert main(["eval", "niah", str(run), *NIAH_SHORT, "--step", "3"]) == 0  # another step: not in step 5's card
    card = card_of(run, 5)
    assert "needle `'#{value}.'` with a 1-digit value" in card and "RULER's needle with a 7-digit value" in card
    assert "| 48 |" in card and "| 160 |" in card and "polar_lastword" in card and "first 4 tok" in card
    assert "RULER on step 5" in card and "| ruler_vt |" in card and "Passkey retrieval on step 5" in card
    assert "position_loss/beyond" in card
    commands = eval_commands(card)
    assert len(commands) == 7 and sum(c.startswith("polar eval niah") for c in commands) == 2
    assert all("--include_path" not in c for c in commands)
    assert shlex.split(next(c for c in commands if " lm " in c))[3:] == [str(run.relative_to(run.parents[1])),
                                                                        "--step", "5", *LM]
    assert_commands_reproduce(run, 5, commands)
