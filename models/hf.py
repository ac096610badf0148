"""Interchange with Hugging Face transformers and mamba_ssm: save/load model folders, for every architecture.

A folder is ``config.json`` + ``model.safetensors`` (or shards with an index). config.json holds the
fields of the stock transformers class the architecture's adapter names (:mod:`models.hf_adapter`:
``MambaForCausalLM``, ``Mamba2ForCausalLM``, ``LlamaForCausalLM``; none for a polar-only architecture),
``tie_word_embeddings``, the token ids, and our whole ModelConfig under ``polar_mamba`` so loading back is
lossless. The weights are the adapter's layout; the LM head is written (``lm_head.weight``) only when it is
untied, as transformers does. :func:`from_pretrained` reads our folders, the stock folders an adapter
reads (transformers' Mamba, Mamba-2 and Llama; mamba_ssm's), and Hub repo ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.build import build_model
from models.config import ModelConfig
from models.registry import get_arch, registered_archs
from models.typed_config import ConfigError

CONFIG_KEY = "polar_mamba"  # our ModelConfig inside config.json
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HEAD = "lm_head.weight"
EMBEDDING = "backbone.embeddings.weight"


def to_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The folder's tensors: the architecture's layout, the head only when untied."""
    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items() if k != HEAD or not cfg.tie_embeddings}
    return {k: v.detach().contiguous() for k, v in get_arch(cfg.arch).hf.export_state_dict(cfg, sd).items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state_dict`, also for the stock layouts the adapter reads. A tied config takes the
    embedding as its head (a stored head is ignored, as transformers does); an untied one needs its own."""
    out = get_arch(cfg.arch).hf.import_state_dict(cfg, dict(sd))
    if cfg.tie_embeddings:
        out[HEAD] = out[EMBEDDING]
    elif HEAD not in out:
        raise ConfigError(f"the config has an untied head (tie_word_embeddings: false) but the weights have no {HEAD}")
    return out


def stock_class(cfg: ModelConfig) -> str | None:
    """The transformers class that loads an export of ``cfg`` (None: polar-mamba only)."""
    return get_arch(cfg.arch).hf.stock_class(cfg)


def hf_config(cfg: ModelConfig, special_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """config.json content: the stock class's fields (from the architecture's adapter) plus our own section."""
    if cfg.final_norm != "rmsnorm" and stock_class(cfg) is not None:
        raise ConfigError(f"Hugging Face's {stock_class(cfg)} ends in an RMSNorm: a model.final_norm: layernorm model "
                          "(the MQAR recipe) cannot be exported; load its cell folder or checkpoint directly instead")
    ids = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, **(special_ids or {})}
    return {**get_arch(cfg.arch).hf.config_json(cfg), "tie_word_embeddings": cfg.tie_embeddings, **ids,
            CONFIG_KEY: cfg.to_dict()}


def save_pretrained(model: torch.nn.Module, out_dir: str | Path, special_ids: dict[str, int] | None = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by our :func:`from_pretrained` and by the stock
    transformers class of the architecture (:func:`stock_class`). Past ``max_shard_bytes`` the weights are
    split into ``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(model.config, special_ids), indent=2) + "\n")
    sd = to_hf_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out


def config_from_json(data: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a config.json we wrote, or a stock one an architecture's adapter reads."""
    if CONFIG_KEY in data:
        return ModelConfig.from_dict(data[CONFIG_KEY])
    for spec in registered_archs():
        if spec.hf.reads(data):
            return spec.hf.config_from_json(data)
    kind = data.get("model_type") or (data.get("ssm_cfg") or {}).get("layer") or "unknown"
    raise ConfigError(f"config.json of type {kind!r} is neither polar-mamba's nor a stock config one of the registered "
                      f"architectures reads ({', '.join(spec.name for spec in registered_archs())})")


def _read_file(path: Path, read) -> dict[str, torch.Tensor]:
    """``read(path)``, with one line naming the file when it is truncated or corrupt."""
    try:
        return read(path)
    except Exception as e:  # safetensors and torch raise several kinds for a damaged file
        what = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise ConfigError(f"{path} is truncated or corrupt ({what}): export it again from its run "
                          "(polar export RUN --force, or --step N for another checkpoint)") from e


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    def safetensors(path: Path) -> dict[str, torch.Tensor]:
        return load_file(str(path))

    if (folder / WEIGHTS).is_file():
        return _read_file(folder / WEIGHTS, safetensors)
    if (folder / WEIGHTS_INDEX).is_file():
        files = sorted(set(json.loads((folder / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        return {k: v for f in files for k, v in _read_file(folder / f, safetensors).items()}
    if (folder / "pytorch_model.bin").is_file():  # mamba_ssm
        return _read_file(folder / "pytorch_model.bin",
                          lambda p: torch.load(p, map_location="cpu", weights_only=True))
    raise FileNotFoundError(f"no weights in {folder}: expected {WEIGHTS}, {WEIGHTS_INDEX} or pytorch_model.bin")


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_folder(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; a missing path shaped like a Hub id (``ORG/NAME``) is downloaded (cached)."""
    p = Path(path_or_repo)
    if p.is_dir():
        return p
    if p.exists() or not HUB_ID.match(str(path_or_repo)):
        raise FileNotFoundError(f"{path_or_repo} not found: pass a run directory, an export folder or a Hub id "
                                "ORG/NAME")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            str(path_or_repo), revision=revision,
            allow_patterns=["*.json", "*.safetensors", "pytorch_model.bin", "*.model"],
        ))
    except Exception as e:  # offline, no such repo, no access: one line, not a network traceback
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise FileNotFoundError(f"{path_or_repo} not found: no such local folder, and the Hub gave no model of "
                                f"that name ({reason})") from e


def from_pretrained(path_or_repo: str | Path, revision: str | None = None,
                    device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load a model of any registered architecture from a folder written by :func:`save_pretrained`, a stock
    transformers or mamba_ssm checkpoint folder an adapter reads, or a Hub repo id (with optional revision)."""
    folder = resolve_folder(path_or_repo, revision)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a model folder")
    cfg = config_from_json(json.loads(cfg_file.read_text()))
    sd = from_hf_state_dict(_read_weights(folder), cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ConfigError(f"{folder}: weights do not match the config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    model.tie_head()  # assign=True replaced the tied tensor
    return model.to(device)
