"""`polar publish`: the Hub folder loads in stock transformers with our ids and logits, the card parses
with the eval results, bad folders are refused before any upload, uploads retry and fail clearly."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoTokenizer, MambaForCausalLM

from models.hf import from_pretrained, save_pretrained
from pretrain.export import load_model
from pretrain.metrics import read_jsonl
from pretrain.publish import PublishError, build_folder, publish, upload, verify_folder
from tests.train_helpers import losses, ok, shell_env, train, write_config
from tokenizer import Tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """A briefly trained baseline and polarized run (4 steps each, checkpoints and validation at 2 and 4)."""
    base = tmp_path_factory.mktemp("publish")
    out = {}
    for name, preset in (("base", "mamba-tiny"), ("polar", "mamba-tiny-polar")):
        cfg = write_config(base, data, name=name, schedule={"steps": 4}, distributed={"zero_stage": 0},
                           precision={"dtype": "auto"},  # resolved (fp32 on CPU) and recorded by the run
                           model={"preset": preset}, eval={"every": 2},
                           checkpoint={"every": 2})
        ok(train(cfg))
        out[name] = base / "runs" / name
    return out


@pytest.mark.parametrize("variant", ["base", "polar"])
def test_dry_run_folder_loads_in_stock_transformers(runs, data, tmp_path, variant, rng):
    folder = tmp_path / "hub"
    publish(runs[variant], "org/tiny", dry_run=True, out=folder)
    ours_tok, hf_tok = Tokenizer.load(data["tokenizer"]), AutoTokenizer.from_pretrained(folder)
    text = "".join(rng.choice(["ROMEO: ", "thou art", "\n", "  ", "é", "ß", "🙂", "Kiss me.", "x"]) for _ in range(40))
    assert hf_tok(text)["input_ids"] == ours_tok.encode(text)
    ours, theirs = load_model(runs[variant]).eval(), MambaForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([ours_tok.encode(text)[:48]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-5)
    prompt = torch.tensor([ours_tok.encode("ROMEO:")])
    hf_out = theirs.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(prompt))
    eos = theirs.generation_config.eos_token_id  # stock generate stops there: ours too (tests/hf_helpers.py)
    assert hf_tok.decode(hf_out[0]) == ours_tok.decode(ours.generate(prompt, 12, eos_token_id=eos)[0].tolist())
    if variant == "polar":
        assert json.loads((folder / "config.json").read_text())["polar_mamba"]["polarize"]["ones"] == 1


def lm_eval_result(step: int, acc: float, limit: int | None = None, task: str = "toy_mc") -> dict:
    """An lm-eval result file as `polar eval lm` writes it (the polar model records the checkpoint step)."""
    n = 8 if limit is None else limit
    return {"results": {task: {"alias": task, "name": task, "sample_len": n, "acc,none": acc,
                               "acc_stderr,none": acc / 10}},
            "higher_is_better": {task: {"acc": True}}, "versions": {task: 1.0}, "n-shot": {task: 0},
            "n-samples": {task: {"original": 8, "effective": n}}, "config": {"checkpoint_step": step, "limit": limit},
            "date": 1000.0 + step}


def card_number(text: str, label: str) -> list[float]:
    """The numbers in the card's table row that starts with ``label``."""
    row = next(line for line in text.splitlines() if line.startswith(f"| {label}"))
    return [float(x) for x in row.split("|")[2].replace("/", " ").split()]


@pytest.mark.parametrize("step", [2, 4])
def test_card_numbers_all_come_from_the_published_step(runs, tmp_path, step, rng):
    run = runs["polar"]
    accs = {s: rng.uniform(0.2, 0.9) for s in (2, 4)}
    for s, acc in accs.items():
        folder = run / "eval" / f"step-{s}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "lm_a.json").write_text(json.dumps(lm_eval_result(s, acc)))
        (folder / "lm_b.json").write_text(json.dumps(lm_eval_result(s, acc / 2, limit=3, task="toy_partial")))
        (folder / "lm_c.json").write_text(json.dumps(lm_eval_result(6 - s, 0.999)))  # misfiled: records the other step
    folder = build_folder(run, tmp_path / "hub", "org/polar-tiny", step=step)
    card = ModelCard.load(folder / "README.md")
    records = read_jsonl(run / "metrics.jsonl")
    train = next(r for r in records if r["kind"] == "train" and r["step"] == step)
    val = next(r for r in records if r["kind"] == "val" and r["step"] == step)
    text = card.text
    assert card_number(text, f"training loss at step {step}") == [round(train["loss"], 4)]
    assert card_number(text, f"validation loss / perplexity at step {step}") == [round(val["val_loss"], 4),
                                                                               round(val["val_ppl"], 2)]
    index = card.data.to_dict()["model-index"][0]["results"]
    assert [(e["dataset"]["name"], e["metrics"][0]["value"]) for e in index] == [("toy_mc", round(accs[step], 4))]
    rows = {line.split("|")[1].strip(): line.split("|")[1:-1] for line in text.splitlines()
            if line.startswith("| toy_")}
    assert float(rows["toy_mc"][4]) == round(accs[step], 4) and float(rows["toy_mc"][5]) == round(accs[step] / 10, 4)
    assert float(rows["toy_partial"][4]) == round(accs[step] / 2, 4) and "3 of 8 (partial)" in rows["toy_partial"][6]
    assert "sample_len" not in text and "0.999" not in text
    assert "polarized-ssm" in card.data.tags and card.data.license == "apache-2.0"
    assert "1 fixed at A=1" in text and f"| steps | {step} of 4" in text and "| fp32, DeepSpeed ZeRO-0 |" in text
    assert "## Intended use and limitations" in text
    for command in ("polar tokenizer train --dataset builtin:shakespeare --vocab-size 512",
                    "polar prepare --dataset builtin:shakespeare", "torchrun --standalone --nproc-per-node 1",
                    f"polar eval lm runs/{run.name} --step {step} --tasks toy_mc\n",  # relative: no local path
                    f"polar eval lm runs/{run.name} --step {step} --tasks toy_partial --limit 3\n"):
        assert command in text


def test_card_shows_niah_results_of_the_step(runs, tmp_path):
    run = runs["base"]
    folder = run / "eval" / "step-4"
    folder.mkdir(parents=True, exist_ok=True)
    cells = [{"length": n, "depth": d, "exact_match": e, "rank1": r, "chance_rank1": 0.1}
             for n, d, e, r in ((64, 0, 0.5, 1.0), (64, 100, 0.0, 0.5), (128, 0, 0.25, 0.75), (128, 100, 0.0, 0.25))]
    (folder / "niah_x.json").write_text(json.dumps({"checkpoint_step": 4, "config": {"samples": 4, "distractors": 9},
                                                    "cells": cells}))
    text = ModelCard.load(build_folder(run, tmp_path / "hub", "org/x") / "README.md").text
    assert "| 64 | 0.250 | 0.750 |" in text and "| 128 | 0.125 | 0.500 |" in text and "chance 0.10" in text


class FakeApi:
    def __init__(self, failures=()):
        self.calls, self.failures = [], list(failures)

    def _maybe_fail(self):
        if self.failures:
            raise self.failures.pop(0)

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw.get("private")))
        self._maybe_fail()

    def create_branch(self, repo_id, branch, **kw):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, folder_path, repo_id, revision, commit_message):
        self.calls.append(("upload_folder", repo_id, revision, commit_message))
        return type("Info", (), {"commit_url": f"https://hub/{repo_id}/commit/1"})()


def test_upload_is_one_commit_on_the_step_branch(runs, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    api = FakeApi(failures=[OSError("connection reset")])  # a transient failure is retried
    msg = publish(runs["base"], "org/base-tiny", private=True, api=api)
    assert "org/base-tiny@step4" in msg
    uploads = [c for c in api.calls if c[0] == "upload_folder"]
    assert uploads == [("upload_folder", "org/base-tiny", "step4", "polar-mamba step_00000004")]
    assert ("create_branch", "org/base-tiny", "step4") in api.calls
    assert ("create_repo", "org/base-tiny", True) in api.calls


def test_auth_failure_is_one_clear_error(runs, tmp_path):
    from huggingface_hub.errors import HfHubHTTPError

    folder = build_folder(runs["base"], tmp_path / "hub", "org/x")
    response = type("Response", (), {"status_code": 401, "headers": {}, "request": None})()
    api = FakeApi(failures=[HfHubHTTPError("401 Unauthorized", response=response)])
    with pytest.raises(PublishError, match="set HF_TOKEN"):
        upload(folder, "org/x", "step4", False, "m", api=api)


@pytest.mark.parametrize("damage", ["missing-tokenizer", "corrupt-weights", "missing-card"])
def test_bad_folder_is_refused_before_upload(runs, tmp_path, damage):
    folder = build_folder(runs["base"], tmp_path / "hub", "org/x")
    if damage == "missing-tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage == "corrupt-weights":
        w = folder / "model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    else:
        (folder / "README.md").unlink()
    api = FakeApi()
    with pytest.raises(PublishError):
        upload(folder, "org/x", "step4", False, "m", api=api)
    assert api.calls == []


def test_sharded_weights_round_trip(runs, tmp_path):
    model = load_model(runs["polar"])
    save_pretrained(model, tmp_path, max_shard_bytes=100_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(from_pretrained(tmp_path)(ids).logits, expected)
        torch.testing.assert_close(MambaForCausalLM.from_pretrained(tmp_path)(ids).logits, expected,
                                   rtol=1e-4, atol=1e-5)


def test_export_writes_the_generation_config_publish_writes(runs, tmp_path):
    from pretrain.export import export

    exported = export(runs["base"], tmp_path / "export")
    published = build_folder(runs["base"], tmp_path / "hub", "org/x")
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen == json.loads((published / "generation_config.json").read_text())
    tok = Tokenizer.load(exported)
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"], gen["do_sample"]) == (
        tok.bos_id, tok.eos_id, tok.pad_id, False)


def test_cli_dry_run_is_a_switch_building_into_the_run(runs):
    from pretrain.cli import main

    assert main(["publish", str(runs["base"]), "--repo-id", "org/x", "--dry-run", "--step", "2"]) == 0
    verify_folder(runs["base"] / "hub" / "step-2")


def test_verify_accepts_a_complete_folder(runs, tmp_path):
    verify_folder(build_folder(runs["polar"], tmp_path / "hub", "org/x"))


def test_the_cards_training_commands_reproduce_the_run_as_written(tmp_path):
    """The card's first reproduce block (tokenizer, data, training), run as written by bash from a fresh
    environment after the originals are moved away, rebuilds the same tokenizer, the same shards and the same
    losses bit for bit. Catches a card naming a flag that no longer exists, a path it does not record (e.g. the
    tokenizer's source or vocabulary), or a recorded config.yaml that does not rebuild the run."""
    from pretrain.cli import main

    tok, data = tmp_path / "tok", tmp_path / "data"
    assert main(["tokenizer", "train", "--dataset", "builtin:shakespeare", "--vocab-size", "512",
                 "--out", str(tok)]) == 0
    assert main(["prepare", "--dataset", "builtin:shakespeare", "--tokenizer", str(tok), "--out", str(data)]) == 0
    cfg = write_config(tmp_path, {"tokenizer": str(tok), "path": str(data)}, name="repro", schedule={"steps": 3},
                       distributed={"zero_stage": 0}, model={"preset": "mamba-tiny"},
                       checkpoint={"every": 3})
    ok(train(cfg))
    run = tmp_path / "runs" / "repro"
    publish(run, "org/tiny", dry_run=True, out=tmp_path / "hub")
    card = (tmp_path / "hub" / "README.md").read_text()
    block = re.search(r"## Reproduce.*?```bash\n(.*?)```", card, re.S)[1]
    commands = [line for line in block.splitlines() if line.strip()]
    assert [c.split()[:2] for c in commands] == [["polar", "tokenizer"], ["polar", "prepare"],
                                                 ["torchrun", "--standalone"]]
    before = {"tok": json.loads((tok / "polar_tokenizer.json").read_text())["fingerprint"],
              "shards": {k: [s["sha256"] for s in v["shards"]]
                         for k, v in json.loads((data / "manifest.json").read_text())["splits"].items()},
              "losses": losses(run)}
    for path in (tok, data, run):
        path.rename(path.with_name(path.name + ".orig"))
    run.mkdir(parents=True)  # the recipe the card names stays where it says
    shutil.copy(run.with_name("repro.orig") / "config.yaml", run / "config.yaml")
    for command in commands:
        out = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=shell_env(), capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, (command, out.stderr[-3000:])
    assert json.loads((tok / "polar_tokenizer.json").read_text())["fingerprint"] == before["tok"]
    assert {k: [s["sha256"] for s in v["shards"]]
            for k, v in json.loads((data / "manifest.json").read_text())["splits"].items()} == before["shards"]
    assert losses(run) == before["losses"] and len(before["losses"]) == 3


PLANTED = {"HF_TOKEN": "hf_plantedTokenValue0123456789", "WANDB_API_KEY": "planted-wandb-key-0123456789",
           "MY_SERVICE_PASSWORD": "planted-password-0123456789"}


def test_nothing_private_leaves_in_an_export_or_a_published_folder(tmp_path):
    """Catches a local absolute path (a home directory, scratch space) or a credential from the environment
    leaving in an exported or published folder (card, config.json, tokenizer files), or a credential in the
    run's logs: corpus, tokenizer, data and init_from source live under a planted .../home/alice/scratch, tokens
    are planted in the environment, and tokenizer train -> prepare -> train -> export -> publish --dry-run run
    as commands from a shell."""
    import sys

    from models.build import build_model
    from pretrain.about import code_version
    from pretrain.config import load_config
    from tests.train_helpers import ROOT
    from tokenizer.sources import shakespeare_files

    scratch = tmp_path / "home" / "alice" / "scratch"
    corpus, tok, prepared, source = (scratch / n for n in ("corpus", "tok", "data", "base-model"))
    corpus.mkdir(parents=True)
    for f in shakespeare_files()[:8]:
        shutil.copy(f, corpus / f"{f.stem}.txt")
    env = {**shell_env(), **PLANTED, "POLAR_LOG": str(tmp_path / "polar.log")}
    project = tmp_path / "project"
    project.mkdir()

    def polar(*args: str) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "pretrain.cli", *map(str, args)], cwd=project, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, (args, out.stderr[-3000:])
        return out

    logs = [polar("tokenizer", "train", "--dataset", corpus, "--vocab-size", 512, "--out", tok),
            polar("prepare", "--dataset", corpus, "--tokenizer", tok, "--out", prepared)]
    paths = {"tokenizer": str(tok), "path": str(prepared)}
    plain = write_config(project, paths, schedule={"steps": 2}, distributed={"zero_stage": 0})
    save_pretrained(build_model(load_config(plain).model), source)
    cfg = write_config(project, paths, schedule={"steps": 2}, distributed={"zero_stage": 0},
                       model={"init_from": str(source)})
    run = project / "runs" / "run"
    logs += [polar("train", cfg), polar("export", run, "--out", tmp_path / "export"),
             polar("publish", run, "--repo-id", "org/tiny", "--dry-run", "--out", tmp_path / "hub")]
    for folder in (tmp_path / "export", tmp_path / "hub"):
        for f in (p for p in folder.rglob("*") if p.is_file()):
            text = f.read_bytes().decode(errors="replace")
            for planted in (*PLANTED.values(), str(scratch), str(tmp_path), "alice", str(ROOT), str(Path.home())):
                assert planted not in text, (f, planted)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "| initialised from | `base-model`" in card and "--dataset corpus --vocab-size 512 --out tok" in card
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["polar_mamba"]["init_from"]["path"] == \
        "base-model"
    assert "More Information Needed" not in card and "[polar-mamba](" not in card  # no link nobody configured
    assert f"| code | polar-mamba {code_version()} (code license Apache-2.0) |" in card
    written = [*(p for p in run.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".yaml", ".txt")),
               tmp_path / "polar.log"]
    for text in [o.stdout + o.stderr for o in logs] + [p.read_text(errors="replace") for p in written]:
        assert not any(v in text for v in PLANTED.values())

