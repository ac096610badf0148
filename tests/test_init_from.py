"""`model.init_from` (pretrain/init_from.py): a run starts from a trained run's weights (polarized on the way) with
the source recorded; killed and resumed it is bitwise the uninterrupted run, without reading the source again;
any other model difference, another tokenizer, an unreachable Hub id is refused in one line, nothing written."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
import yaml

from models import ModelConfig
from models.build import build_model
from models.hf import UntrustedPickleError, save_pretrained
from models.typed_config import ConfigError
from pretrain import checkpoint as ckpt
from pretrain.data import DistributedSampleLoader, PackedDataset, TokenShards
from pretrain.export import load_model
from pretrain.init_from import initial_weights, weights_sha256
from pretrain.model_card import StepResults, render_card
from tests.test_polarize import assert_polarized_logits_equal
from tests.train_helpers import fault_env, losses, ok, preempted, train, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source(tmp_path_factory, data) -> dict:
    """A 3-step baseline run (mamba-tiny, d_model 32): the checkpoint the tests start from."""
    tmp = tmp_path_factory.mktemp("source")
    cfg = write_config(tmp, data, name="src", model={"preset": "mamba-tiny"}, schedule={"steps": 3, "warmup_steps": 1},
                       distributed={"zero_stage": 1})
    ok(train(cfg))
    return {"run": tmp / "runs" / "src", "tmp": tmp}


def first_step_loss(model, data: dict) -> float:
    """The mean loss of ``model`` over the micro-batches of the trainer's first step (one process, write_config's
    batch: 4 micro-batches of 4 x 32 tokens, seed 7): the independent reference."""
    tokens = TokenShards(data["path"], "train")
    loader = DistributedSampleLoader(PackedDataset(tokens, 32, model.config.vocab_size), 4, 0, 1, 7)
    with torch.no_grad():
        return sum(model(x, labels=y).loss.item() for x, y in (next(loader) for _ in range(4))) / 4


@pytest.mark.parametrize("dtype, rel", [(torch.float32, 2e-6), (torch.float64, 1e-13)])
def test_polarizing_one_of_our_runs_keeps_its_logits(source, dtype, rel, rng):
    """Catches a polarization that holds for stock layouts but not for a checkpoint our trainer wrote (ZeRO
    consolidation, tied head); tolerances as in tests/test_polarize.py."""
    assert_polarized_logits_equal(load_model(source["run"]).eval().to(dtype), rng, rel)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_first_step_sees_the_sources_function(stage, source, data, tmp_path):
    """Catches an init_from that is ignored (random weights), loaded before the ZeRO engine re-initialises them, or
    polarized so that the function changes: the first step's loss is the source's loss on that batch (the polar
    channels add an exact 0; the widened projection GEMM may round differently, hence 1e-6)."""
    cfg = write_config(tmp_path, data, model={"init_from": str(source["run"])}, distributed={"zero_stage": stage},
                       schedule={"steps": 1, "warmup_steps": 0})
    out = ok(train(cfg))
    assert f"initialised from {source['run']}" in out.stdout
    expected = first_step_loss(load_model(source["run"]), data)
    (step, loss), = losses(tmp_path / "runs" / "run")
    assert abs(float.fromhex(loss) - expected) <= 1e-6 * expected


@pytest.mark.distributed
def test_resume_is_bitwise_and_never_reads_the_source_again(source, data, tmp_path):
    """Catches a resumed run that re-initialises from the source (its weights would jump back), one that needs
    the source to exist, and provenance lost between config.yaml, checkpoints and the run's config; ZeRO-3 on two
    processes, the stage that partitions the weights the source fills."""
    src = tmp_path / "src-copy"
    shutil.copytree(source["run"], src)
    common = dict(model={"init_from": str(src)}, distributed={"zero_stage": 3})
    full = write_config(tmp_path, data, name="full", **common)
    split = write_config(tmp_path, data, name="split", **common)
    ok(train(full, 2))
    preempted(train(split, 2, env=fault_env(signal_at_step=3)), 2)
    shutil.rmtree(src)  # the resume must not read it
    second = ok(train(split, 2))
    assert "resumed from" in second.stdout and "initialised from" not in second.stdout
    assert losses(tmp_path / "runs" / "split") == losses(tmp_path / "runs" / "full")
    sha = weights_sha256(load_model(source["run"]).state_dict())
    recorded = yaml.safe_load((tmp_path / "runs" / "split" / "config.yaml").read_text())["model"]["init_from"]
    assert recorded == {"path": str(src), "step": None, "revision": "step_00000003", "sha256": sha,
                        "trust_pickle": False}
    ckpt_dir = tmp_path / "runs" / "split" / "checkpoints"
    state = ckpt.read_state(ckpt_dir, ckpt.latest_tag(ckpt_dir))
    assert state["config"]["model"]["init_from"] == recorded
    card = render_card("org/x", {**state, "step": 8}, tmp_path / "runs" / "split", 1000, StepResults(), "mit", "cpu")
    assert f"| initialised from | `{src.name}` (revision step_00000003, weights sha256 `{sha}`) |" in card


def test_refusals_name_the_difference_and_write_nothing(source, data, tmp_path):
    """Catches a source silently reshaped or a run directory left behind by a refused start: each difference is
    one line naming the field."""
    run = str(source["run"])
    cases = [({"init_from": run, "d_model": 48}, "model.d_model: the source .* has 32, the config asks for 48"),
             ({"init_from": run, "arch": "mamba2", "preset": "mamba2-tiny", "d_model": 32},
              "model.arch: the source .* is 'mamba', the config asks for 'mamba2'"),
             ({"init_from": run, "vocab_size": 1024}, "model.vocab_size: the source .* has 512 embedding rows")]
    for change, message in cases:
        cfg = write_config(tmp_path, data, model=change)
        bad = train(cfg)
        assert bad.returncode == 2, bad.stderr[-2000:]
        assert re.search(message, bad.stderr.strip().splitlines()[-1]), bad.stderr[-500:]
        assert not (tmp_path / "runs").exists()  # no run folder, no train.lock


def test_other_tokenizers_and_offline_hub_ids_are_refused(source, tmp_path):
    """Catches a continued run on another tokenizer's ids (same vocabulary size, other pieces) and a network
    traceback instead of one line for a Hub id that cannot be fetched."""
    cfg = ModelConfig.preset("mamba-tiny", d_model=32, init_from=str(source["run"]))
    with pytest.raises(ConfigError, match="data.tokenizer: the source .* was trained with tokenizer"):
        initial_weights(cfg, "another-fingerprint", 0)
    hub = ModelConfig.preset("mamba-tiny", d_model=32, init_from="nobody-polar/no-such-model")
    with pytest.raises(FileNotFoundError, match="not found: no such local folder, and the Hub gave no model"):
        initial_weights(hub, None, 0)


def test_stock_untied_folder_and_export_are_sources(source, rng, tmp_path):
    """Catches a loader path init_from does not take (an export; a stock transformers Mamba-2 folder with an
    untied head) and a sha256 that depends on the file format: a run's checkpoint and its export hash alike."""
    run_model = load_model(source["run"])
    save_pretrained(run_model, tmp_path / "export")
    cfg = ModelConfig.preset("mamba-tiny-polar", d_model=32, init_from=str(tmp_path / "export"))
    _, prov = initial_weights(cfg, None, 0)
    assert prov.sha256 == weights_sha256(run_model.state_dict()) and prov.revision is None
    from transformers import Mamba2Config, Mamba2ForCausalLM

    vocab = rng.randrange(301, 700, 2)
    stock = Mamba2ForCausalLM(Mamba2Config(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, expand=2,
                                           num_heads=4, head_dim=16, n_groups=1, state_size=8,
                                           tie_word_embeddings=False))
    stock.save_pretrained(tmp_path / "stock")
    dst = ModelConfig.from_dict({**ModelConfig.preset("mamba2-tiny-polar").to_dict(), "d_model": 32,
                                 "vocab_size": vocab, "pad_vocab_size_multiple": 1, "tie_embeddings": False,
                                 "ssm": {"d_state": 8, "head_dim": 16, "chunk_size": 256},
                                 "init_from": {"path": str(tmp_path / "stock")}})
    sd, _ = initial_weights(dst, None, 0)
    assert torch.equal(sd["lm_head.weight"], stock.lm_head.weight)


def test_a_pickle_only_source_loads_only_when_trusted(tmp_path):
    """Catches a third-party pickle (pytorch_model.bin beside a config.json) unpickled without the user's say-so,
    by init_from or by the evaluations: refused in one line naming the flag; trusted, it loads (weights_only)."""
    from safetensors.torch import load_file

    from eval.loading import load_any_model

    model = build_model(ModelConfig.preset("mamba-tiny", d_model=32))
    folder = save_pretrained(model, tmp_path / "third-party")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    cfg = ModelConfig.preset("mamba-tiny", d_model=32, init_from=str(folder))
    for load in (lambda: initial_weights(cfg, None, 0), lambda: load_any_model(folder)):
        with pytest.raises(UntrustedPickleError) as refused:
            load()
        message = str(refused.value)
        assert len(message.splitlines()) == 1 and "pickle weights only (pytorch_model.bin)" in message
        assert "--trust-pickle" in message and "model.init_from.trust_pickle: true" in message
    trusted = ModelConfig.preset("mamba-tiny", d_model=32, init_from={"path": str(folder), "trust_pickle": True})
    sd, prov = initial_weights(trusted, None, 0)
    assert prov.sha256 == weights_sha256(model.state_dict()) == weights_sha256(sd)
    assert weights_sha256(load_any_model(folder, trust_pickle=True).state_dict()) == prov.sha256
