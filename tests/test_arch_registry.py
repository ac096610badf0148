"""The architecture registry and the LM skeleton: a toy third architecture registered from outside the package
(tests/toy_arch.py, loaded in `polar` subprocesses through POLAR_PLUGINS) plans, trains, resumes, exports, loads and
is diagnosed without any project file naming it; registration fails loudly; no `arch ==` chains are left; the models
package imports one way; untied heads work for every architecture; every config in configs/ still loads."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tests.toy_arch as toy
from models import ModelConfig, build_model
from models.hf import from_pretrained, save_pretrained
from models.hf_adapter import HFAdapter, PolarOnlyAdapter
from models.registry import PLUGINS_ENV, ArchSpec, get_arch, register_arch, registered_archs
from models.typed_config import ConfigError
from tests.train_helpers import ROOT, losses, ok, train, write_config

PACKAGES = ("models", "pretrain", "eval", "launch")


@dataclasses.dataclass
class Toy2Config(toy.ToyConfig):
    arch: str = "toyrnn2"


def spec_fields(**overrides):
    """The toy's entry under another name (and config class), without presets, changed by ``overrides``."""
    fields = {f.name: getattr(toy.SPEC, f.name) for f in dataclasses.fields(ArchSpec)}
    return {**fields, "name": "toyrnn2", "config": Toy2Config, "presets": {}, **overrides}


# Registration -------------------------------------------------------------------------------------------


def test_a_missing_piece_fails_at_registration():
    """Catches an architecture whose entry lacks a part (no HF adapter, no counter, a config of another arch,
    an adapter missing a method) registering anyway and failing only when that part is used."""
    fields = spec_fields()
    del fields["hf"]
    with pytest.raises(TypeError, match="hf"):
        ArchSpec(**fields)
    with pytest.raises(TypeError, match="callable"):
        ArchSpec(**spec_fields(flops_per_token=None))
    with pytest.raises(TypeError, match="arch defaults to 'toyrnn2'"):  # ToyConfig's arch is toyrnn
        ArchSpec(**spec_fields(config=toy.ToyConfig))
    with pytest.raises(ConfigError, match="preset toyrnn2-bad: model.toy.hidden must be a multiple of 8"):
        register_arch(ArchSpec(**spec_fields(presets={"toyrnn2-bad": {"toy": {"hidden": 12}}})))
    with pytest.raises(ConfigError, match="unknown architecture 'toyrnn2'"):  # the refused entry is not kept
        get_arch("toyrnn2")

    class HalfAdapter(HFAdapter):
        def config_json(self, cfg):
            return {}

    with pytest.raises(TypeError, match="abstract"):
        HalfAdapter()


def test_duplicate_registration_fails():
    """Catches a second entry (or a preset name) silently replacing an architecture."""
    with pytest.raises(ValueError, match="'mamba' is already registered"):
        register_arch(get_arch("mamba"))

    with pytest.raises(ValueError, match=r"presets \['toyrnn-tiny'\] are already registered"):
        register_arch(ArchSpec(**spec_fields(presets=toy.SPEC.presets)))
    with pytest.raises(ConfigError, match="toyrnn2"):  # nothing of the refused entry stayed behind
        get_arch("toyrnn2")


def test_unknown_arch_is_one_line_listing_the_registered():
    """Catches an unknown arch failing deep inside (a KeyError, a wrong default) instead of naming the choices."""
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({"arch": "gru", "d_model": 64})
    message = str(e.value)
    assert "\n" not in message and "unknown architecture 'gru'" in message and PLUGINS_ENV in message
    assert all(spec.name in message for spec in registered_archs())


def test_a_field_of_another_architecture_is_named():
    """Catches arch-specific keys silently accepted (or answered with a bare 'unknown key') for another arch."""
    with pytest.raises(ConfigError, match="model.n_head is a field of arch transformer, not of mamba2"):
        ModelConfig.preset("mamba2-tiny", n_head=4)
    with pytest.raises(ConfigError, match="model.toy is a field of arch toyrnn, not of transformer"):
        ModelConfig.preset("transformer-tiny", **{"toy.hidden": 8})


# The toy architecture ---------------------------------------------------------------------------------


def test_toy_arch_brings_its_own_config_and_decodes_like_its_forward():
    """Catches a plugin needing ModelConfig edits for its fields, or the skeleton's decoding assuming Mamba's state."""
    cfg = ModelConfig.from_dict({"arch": "toyrnn", "d_model": 32, "n_layer": 2, "vocab_size": 100,
                                 "toy": {"hidden": 24}})
    assert isinstance(cfg, toy.ToyConfig) and cfg.toy.hidden == 24 and "toy" in cfg.to_dict()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="toy.hidden must be a multiple of 8"):
        ModelConfig.preset("toyrnn-tiny", **{"toy.hidden": 12})
    model = build_model(cfg).eval()
    ids = torch.randint(0, 100, (2, 11))
    with torch.no_grad():
        full = model(ids).logits
        states = model.new_states(2)
        cut = int(torch.randint(1, 10, ()))
        parts = torch.cat([model(ids[:, :cut], states=states).logits, model(ids[:, cut:], states=states).logits], 1)
    torch.testing.assert_close(parts, full, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_plugin_arch_plans_trains_resumes_exports_loads_and_is_diagnosed(tmp_path, data, monkeypatch, capsys):
    """The whole toolchain on an architecture no project file names, `polar train` in subprocesses that import it
    through POLAR_PLUGINS. Catches an `arch` chain left in plan/train/checkpoint/export/load/diagnose, and a worker
    process that cannot see a plugin architecture."""
    from pretrain.cli import main
    from pretrain.export import load_model

    monkeypatch.setenv(PLUGINS_ENV, "tests.toy_arch")
    cfg = write_config(tmp_path, data, model={"preset": "toyrnn-tiny"}, schedule={"steps": 4, "warmup_steps": 1},
                       checkpoint={"every": 2, "keep_last": 3})
    assert main(["plan", str(cfg), "--gpus", "1"]) == 0
    assert "activations" in capsys.readouterr().out
    ok(train(cfg, 1, "--schedule.steps", "2"))
    second = ok(train(cfg))  # continues the same run to step 4
    assert "resumed from" in second.stdout
    run = tmp_path / "runs" / "run"
    assert [s for s, _ in losses(run)] == [1, 2, 3, 4]
    assert main(["export", str(run)]) == 0
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["model_type"] == "polar_toyrnn" and config["polar_mamba"]["toy"]["hidden"] == 16
    exported, trained = from_pretrained(run / "export").eval(), load_model(run).eval()
    assert isinstance(exported, toy.ToyLM)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits, rtol=0, atol=0)
    assert main(["diagnose", str(run), "--out", str(tmp_path / "diag"), "--batch", "2", "--seq-len", "16"]) == 0
    assert {"recency.png", "oversmoothing.json"} <= {p.name for p in (tmp_path / "diag").iterdir()}


def test_polar_info_columns_come_from_each_architecture(capsys):
    """Catches `polar info` printing Mamba's state channels (16+0+0) for architectures that have none."""
    from pretrain.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out.split("model presets", 1)[1]
    sections = dict(re.findall(r"^  (\w+) \(.*?\)\n((?:    .*\n?)+)", out, re.M))
    assert set(sections) == {spec.name for spec in registered_archs()}
    assert "heads" in sections["transformer"] and "d_ff" in sections["transformer"]
    assert not re.search(r"\d+\+\d+\+\d+", sections["transformer"] + sections["toyrnn"])
    assert re.search(r"mamba-tiny-polar .* 16\+1\+1", sections["mamba"])
    assert "hidden" in sections["toyrnn"] and "toyrnn-tiny" in sections["toyrnn"]


# Untied heads -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["mamba-tiny-polar", "mamba2-tiny", "transformer-tiny", "toyrnn-tiny"])
def test_untied_head_for_every_architecture(tmp_path, preset):
    """model.tie_embeddings: false builds a separate head for every architecture, counted, gathered under ZeRO-3,
    and exported as lm_head.weight with tie_word_embeddings false. Catches an untied config refused, or a head
    silently tied again on save or load."""
    tied = build_model(ModelConfig.preset(preset))
    model = build_model(ModelConfig.preset(preset, tie_embeddings=False)).eval()
    head, emb = model.lm_head.weight, model.backbone.embeddings.weight
    assert head is not emb and not torch.equal(head, emb)
    assert model.num_parameters() == tied.num_parameters() + head.numel()
    assert any(p is head for _, p in model.borrowed_parameters())
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    back = from_pretrained(tmp_path).eval()
    assert back.lm_head.weight is not back.backbone.embeddings.weight and back.config == model.config
    ids = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_untied_transformer_trains_checkpoints_and_exports_as_llama(tmp_path, data):
    """`polar train` (ZeRO-2) with an untied head, then `polar export`: stock LlamaForCausalLM loads the folder with
    the logits of the checkpoint. Catches the untied head lost in the optimizer, the checkpoint or the export."""
    from transformers import LlamaForCausalLM

    from pretrain.cli import main
    from pretrain.export import load_model

    cfg = write_config(tmp_path, data, model={"preset": "transformer-tiny", "d_model": 32, "n_head": 2,
                                              "tie_embeddings": False}, schedule={"steps": 3, "warmup_steps": 1})
    ok(train(cfg))
    run = tmp_path / "runs" / "run"
    trained = load_model(run).eval()
    assert not trained.config.tie_embeddings
    assert main(["export", str(run)]) == 0
    stock = LlamaForCausalLM.from_pretrained(run / "export").eval()
    ids = torch.randint(0, 512, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, trained(ids).logits, rtol=1e-4, atol=1e-4)


# Configs ----------------------------------------------------------------------------------------------


OLD_LAYOUT = {  # a run config saved before the per-architecture split: every architecture's fields in one section
    "arch": "transformer", "d_model": 64, "n_layer": 2, "vocab_size": 512, "pad_vocab_size_multiple": 8,
    "norm_eps": 1e-5, "residual_in_fp32": True, "tie_embeddings": True, "initializer_range": 0.02,
    "rescale_prenorm_residual": True, "init": "mamba_ssm", "final_norm": "rmsnorm",
    "ssm": {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto", "dt_min": 0.001, "dt_max": 0.1,
            "dt_init_floor": 0.0001, "conv_bias": True, "proj_bias": False, "head_dim": 64, "n_groups": 1,
            "chunk_size": 256},
    "polarize": {"ones": 0, "zeros": 0, "zero_mode": "exact"}, "n_head": 4, "d_ff": None, "rope_theta": 10000.0,
}


@pytest.mark.parametrize("arch,preset", [("transformer", "transformer-tiny"), ("mamba", "mamba-tiny"),
                                         ("mamba2", "mamba2-tiny")])
def test_saved_configs_of_the_one_class_layout_still_load(arch, preset):
    """Catches checkpoints and exports written before the split becoming unloadable."""
    expected = ModelConfig.preset(preset)
    old = {**OLD_LAYOUT, "arch": arch, "ssm": {**OLD_LAYOUT["ssm"], **expected.to_dict().get("ssm", {})}}
    assert ModelConfig.from_dict(old) == expected


def _load_any_config(path: Path):
    from eval.mqar import load_mqar_config
    from eval.study import load_study_config
    from models.typed_config import load_yaml
    from pretrain.config import build_config, load_config

    kind = path.relative_to(ROOT / "configs").parts[0]
    if kind == "mqar":
        return load_mqar_config(path).model
    if kind == "studies" and "study" in load_yaml(path):  # `polar study depth`: the base recipe with the study's
        # overrides and each variant's model keys (the other files there are the recipes of a study driver)
        study = load_study_config(path)
        base = load_yaml(ROOT / study.study.base)
        for variant in study.study.variants.values():
            build_config({**base, **{k: {**base.get(k, {}), **v} for k, v in study.train.items()}},
                         {f"model.{k}": v for k, v in variant.items()})
        return build_config(base).model
    if kind == "diagnose":
        return build_config({"model": load_yaml(path)["model"]}).model
    return load_config(path).model


@pytest.mark.parametrize("path", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_config_in_configs_loads(path):
    """Catches a recipe left in a layout the config classes no longer read (a key moved between sections)."""
    loaded = _load_any_config(ROOT / path)
    if isinstance(loaded, ModelConfig):
        assert type(loaded) is get_arch(loaded.arch).config


def test_mamba2_chinchilla_recipes_match_the_mamba_ones():
    from pretrain.config import load_config

    for polar in ("", "-polar"):
        m1, m2 = (load_config(f"{ROOT}/configs/chinchilla-130m{k}{polar}.yaml") for k in ("", "-mamba2"))
        assert m2.model.arch == "mamba2" and m2.model.polarize == m1.model.polarize
        assert (m2.optim, m2.schedule, m2.data) == (m1.optim, m1.schedule, m1.data)


# Code structure ---------------------------------------------------------------------------------------


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, inside a function or a TYPE_CHECKING block: not run at import) for every import of ``path``."""
    tree, out = ast.parse(path.read_text()), []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            typing_only = isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING"
            nested = in_function or typing_only or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((a.name, nested) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module:
                out.extend((child.module if child.module != "models" else f"models.{a.name}", nested)
                           if child.module == "models" and (ROOT / "models" / f"{a.name}.py").exists()
                           else (child.module, nested) for a in child.names)
            visit(child, nested)

    visit(tree, False)
    return out


def _assert_acyclic(graph: dict[str, set[str]]) -> None:
    state = {}

    def visit(node, trail):
        if state.get(node) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(trail + [node])}")
        if state.get(node) != "done":
            state[node] = "open"
            for dep in sorted(graph.get(node, ())):
                visit(dep, trail + [node])
            state[node] = "done"

    for node in graph:
        visit(node, [])


def test_models_imports_point_one_way():
    """models/*.py import each other without a cycle, with no import inside a function to dodge one, and the model
    modules (mamba, mamba2, transformer) take shared parts from shared modules, not from each other. Catches the old
    build -> mamba -> hub -> hf -> build circle and transformer.py importing RMSNorm from mamba.py."""
    graph = {}
    for path in sorted((ROOT / "models").glob("*.py")):
        name = "models" if path.stem == "__init__" else f"models.{path.stem}"
        imports = _imports(path)
        assert not [m for m, nested in imports if nested and m.startswith("models")], f"{name} imports in a function"
        graph[name] = {m for m, _ in imports if m == "models" or m.startswith("models.")} - {name}
    _assert_acyclic(graph)
    model_modules = {"models.mamba", "models.mamba2", "models.transformer"}
    for module in model_modules:
        assert not graph[module] & (model_modules - {module}), f"{module} imports another model module"


# A package imports only packages of a lower layer at module level (imports inside handlers are lazy loads).
LAYERS = {"kernels": 0, "tokenizer": 0, "models": 1, "pretrain": 2, "launch": 3, "eval": 4}


def test_project_imports_are_acyclic_and_layered():
    """Module-level imports across every package form no cycle, and each points down the layers kernels/tokenizer
    <- models <- pretrain <- launch <- eval. Catches a circle between packages (e.g. pretrain importing eval at
    module level while eval imports pretrain) that would only show as an ImportError in some import order."""
    graph, wrong = {}, []
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            deps = {m for m, nested in _imports(path) if not nested and m.split(".")[0] in LAYERS}
            graph[name] = deps - {name}
            wrong += [f"{name} -> {d}" for d in deps if LAYERS[d.split(".")[0]] > LAYERS[pkg]]
    assert wrong == []
    _assert_acyclic(graph)


def test_no_architecture_chains_outside_the_registry():
    """Catches `if cfg.arch == ...` branches creeping back (a new architecture would need edits there again)."""
    # (Hugging Face's model_type values, e.g. "mamba" in models/hf_mamba.py, are the adapters' own vocabulary)
    pattern = re.compile(r"""\barch["')\]]*\s*(==|!=|in\s*[(\[{]|not\s+in\b)|(==|!=)\s*["'](mamba2|transformer)["']""")
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_polar_only_adapter_is_complete():
    assert isinstance(PolarOnlyAdapter("x"), HFAdapter)


def test_a_run_saved_in_the_one_class_layout_resumes_and_a_real_change_is_still_refused(tmp_path):
    """Catches resume comparing the saved model config as a raw dict: a run checkpointed before the per-architecture
    split would read as 'trained with a different model config' and could never be resumed."""
    from pretrain.checkpoint import CheckpointError, check_compatible

    expected = ModelConfig.preset("mamba-tiny")
    old = {**OLD_LAYOUT, "arch": "mamba", "ssm": {**OLD_LAYOUT["ssm"], **expected.to_dict()["ssm"]}}
    meta = {"config": {"model": expected.to_dict(), "distributed": {"zero_stage": 2}}}
    check_compatible({"config": {"model": old}}, meta, tmp_path)
    with pytest.raises(CheckpointError, match="different model config.*d_model"):
        check_compatible({"config": {"model": {**old, "d_model": 96}}}, meta, tmp_path)
