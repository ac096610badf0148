"""Model loading from any reference (run directory, run + step, DeepSpeed tag, exported folder) and
`polar export`: consolidate a checkpoint (ZeRO 0-3) into the HF-compatible folder of models/hf.py.

An export leaves the machine (``polar publish`` builds on it): its config.json, tokenizer files and card name
local paths only as pretrain/privacy.py allows (``model.init_from.path`` by its last component or Hub id, the
tokenizer's source as a public dataset spec), and the folder is refused if a local absolute path or a credential
from the environment is still in it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch.nn as nn

from models.build import build_model
from models.config import ModelConfig
from models.hf import from_pretrained, save_pretrained
from pretrain import checkpoint as ckpt
from pretrain.privacy import check_private, public_path, public_spec
from tokenizer.atomic import write_atomically


def checkpoint_location(path: str | Path, step: int | None = None) -> tuple[Path, str] | None:
    """(checkpoints dir, tag) when ``path`` is a run directory, its checkpoints/ folder or a tag folder;
    None when it is something else (an exported folder)."""
    p = Path(path)
    if (p / ckpt.STATE_FILE).is_file() and step is None:  # a tag folder
        return p.parent, p.name
    for ckpt_dir in (p / "checkpoints", p):
        if (ckpt_dir / "latest").is_file() or ckpt.list_tags(ckpt_dir):
            return ckpt_dir, ckpt.resolve_tag(ckpt_dir, step)
    return None


def eval_folder(path: str | Path, step: int | None = None) -> Path:
    """Where evaluations of a model reference are kept: ``RUN/eval/step-N`` for a checkpoint (N resolved: the
    latest unless ``step``), ``EXPORT/eval`` for an exported or transformers folder, ``runs/hub/ORG--NAME/eval``
    for a Hub id. The one step naming scheme of RUN/eval/."""
    if not Path(path).exists():
        return Path("runs") / "hub" / str(path).replace("/", "--") / "eval"
    loc = checkpoint_location(path, step)
    if loc is None:
        return Path(path) / "eval"
    return loc[0].parent / "eval" / f"step-{ckpt.step_of(loc[1])}"


def load_checkpoint_model(ckpt_dir: Path, tag: str) -> tuple[nn.Module, dict]:
    state = ckpt.read_state(ckpt_dir, tag)
    model = build_model(ModelConfig.from_dict(state["config"]["model"]))
    sd = ckpt.consolidated_state_dict(ckpt_dir, tag)
    sd.setdefault("lm_head.weight", sd["backbone.embeddings.weight"])
    model.load_state_dict(sd)
    return model, state


def load_model(path: str | Path, step: int | None = None, trust_pickle: bool = False) -> nn.Module:
    """A MambaLM or TransformerLM from a run directory (latest checkpoint, or ``step``), a tag folder, or
    an export (pickle-only weights only with ``trust_pickle``: models/hf.py)."""
    loc = checkpoint_location(path, step)
    if loc is not None:
        return load_checkpoint_model(*loc)[0]
    if step is not None:
        raise FileNotFoundError(f"{path} has no checkpoints: --step needs a run directory")
    return from_pretrained(path, trust_pickle=trust_pickle)


def run_tokenizer(tok: str):
    """The tokenizer a run's config names (any kind: tokenizer/load.py), refused in one line when it is gone."""
    from tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(tok)
    except (TokenizerError, OSError) as e:
        raise FileNotFoundError(f"tokenizer {tok} named by the run's config cannot be loaded ({e}): restore it or "
                                "edit the config") from e


def tokenizer_special_ids(tok) -> dict[str, int | None]:
    """config.json's special ids of a loaded tokenizer (None where it has none)."""
    return {f"{k}_token_id": (i if i >= 0 else None) for k, i in
            (("pad", tok.pad_id), ("bos", tok.bos_id), ("eos", tok.eos_id))}


def write_generation_config(folder: Path) -> None:
    """``generation_config.json`` from the folder's config.json special ids: greedy by default."""
    cfg = json.loads((folder / "config.json").read_text())
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    (folder / "generation_config.json").write_text(json.dumps({**gen, "do_sample": False}, indent=2) + "\n")


def export(run: str | Path, out: str | Path, step: int | None = None, force: bool = False,
           max_shard_bytes: int | None = None, finish: Callable[[Path, nn.Module, dict], None] | None = None) -> Path:
    """Write the HF-compatible folder for a checkpoint (plus the tokenizer when the run names one, and
    ``generation_config.json``). ``finish(folder, model, state)`` may add files (``polar publish`` adds the
    card). The folder is built beside ``out`` and renamed into place (tokenizer/atomic.py), so a failure leaves
    ``out`` untouched."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists: pass --force to replace it or choose another --out")
    loc = checkpoint_location(run, step)
    if loc is None:
        raise FileNotFoundError(f"no checkpoints under {run}: pass a run directory written by polar train")
    model, state = load_checkpoint_model(*loc)
    base, local = loc[0].parent.parent.parent, _local_paths(state["config"], loc[0].parent)
    model.config = replace(model.config, init_from=replace(
        model.config.init_from, path=model.config.init_from.path and public_path(model.config.init_from.path, base)))
    name = state["config"]["data"].get("tokenizer")
    tok = run_tokenizer(name) if name else None

    def fill(tmp: Path) -> None:
        save_pretrained(model, tmp, tokenizer_special_ids(tok) if tok else None, max_shard_bytes)
        if tok:  # so transformers.AutoTokenizer, lm-eval and our evals load the tokenizer the model was trained with
            tok.save_pretrained(tmp)
            _public_tokenizer_source(tmp, base)
        write_generation_config(tmp)
        if finish is not None:
            finish(tmp, model, state)
        check_private(tmp, local)

    write_atomically(out, fill, force)
    return out


def _local_paths(cfg: dict, run_dir: Path) -> list[str]:
    """The local paths a run's config names (run, data, tokenizer, init_from source): none may leave in an export."""
    data = cfg["data"]
    return [str(run_dir), cfg["run"]["out_dir"], data.get("path") or "", data.get("tokenizer") or "",
            *(s["path"] for s in data.get("sources") or []), cfg["model"].get("init_from", {}).get("path") or ""]


def _public_tokenizer_source(folder: Path, base: Path) -> None:
    """polar_tokenizer.json's ``source`` (the dataset the tokenizer was trained on) as a public dataset spec."""
    meta_file = folder / "polar_tokenizer.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("source"):
        meta_file.write_text(json.dumps({**meta, "source": public_spec(meta["source"], base)}, indent=2) + "\n")
