"""Interchange with Hugging Face transformers and mamba_ssm: save/load folders, convert layouts.

Our parameter names already follow transformers' ``MambaForCausalLM``; what differs is A_log. We keep
A_log for the N learned channels only. Stock transformers has one A_log over all state channels, so
export expands it to ``[-inf]*ones ++ learned ++ [+inf]*zeros`` (DESIGN §2): A = -exp(A_log) is then
-0 and -inf, so exp(Δ·A) is exactly 1 and 0 in transformers' forward pass. (In ``zero_mode:
reference`` the zero channels export as A_log = log(100), i.e. the paper's A = -100.) Our full model
config rides along in config.json under ``polar_mamba`` so loading back is lossless.

mamba_ssm checkpoints (``config.json`` with d_model/n_layer/ssm_cfg and ``pytorch_model.bin``) differ
only by ``backbone.embedding.weight``; :func:`from_pretrained` reads them too. Mamba-2 (``arch: mamba2``,
transformers' ``Mamba2ForCausalLM``) converts in :mod:`models.hf_mamba2`. The Transformer baseline saves to
the same folder format (config.json with our config, model.safetensors), loadable by polar only.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models import hf_mamba2
from models.build import build_model
from models.config import ModelConfig
from models.mamba import MambaLM
from models.typed_config import ConfigError

CONFIG_KEY = "polar_mamba"  # our ModelConfig inside config.json
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def _expanded_a_log(a_log: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    ones = a_log.new_full((a_log.shape[0], cfg.polarize.ones), -math.inf)
    zero_value = math.log(100.0) if cfg.polarize.zero_mode == "reference" else math.inf
    zeros = a_log.new_full((a_log.shape[0], cfg.polarize.zeros), zero_value)
    return torch.cat([ones, a_log, zeros], dim=1)


def to_hf_state_dict(model: MambaLM) -> dict[str, torch.Tensor]:
    """transformers-layout tensors (A_log expanded over all channels, tied head omitted)."""
    cfg = model.config
    if cfg.arch == "mamba2":
        return hf_mamba2.to_hf_state_dict(model)
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        out[name] = _expanded_a_log(t, cfg) if name.endswith("mixer.A_log") else t
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state_dict` (also accepts mamba_ssm's ``backbone.embedding.weight``)."""
    if cfg.arch == "mamba2":
        return hf_mamba2.from_hf_state_dict(sd, cfg)
    out = {}
    n_ones, N = cfg.polarize.ones, cfg.ssm.d_state
    for name, t in sd.items():
        name = name.replace("backbone.embedding.weight", "backbone.embeddings.weight")
        if name.endswith("mixer.A_log"):
            if t.shape[1] != cfg.d_state_total:
                raise ConfigError(f"{name} has {t.shape[1]} state channels, config expects {cfg.d_state_total}")
            t = t[:, n_ones : n_ones + N]
        out[name] = t
    out.setdefault("lm_head.weight", out["backbone.embeddings.weight"])
    return out


def hf_config(cfg: ModelConfig, special_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """config.json content that stock ``transformers.MambaConfig`` reads, plus our own section."""
    ids = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, **(special_ids or {})}
    if cfg.arch == "transformer":  # no stock transformers class has our Transformer baseline's layout: polar loads it
        return {"architectures": ["TransformerLM"], "model_type": "polar_transformer", **ids, CONFIG_KEY: cfg.to_dict()}
    if cfg.final_norm != "rmsnorm":
        raise ConfigError("Hugging Face's Mamba ends in an RMSNorm: a model.final_norm: layernorm model (the MQAR "
                          "recipe) cannot be exported; load its cell folder or checkpoint directly instead")
    if cfg.arch == "mamba2":
        return hf_mamba2.hf_config(cfg, ids, CONFIG_KEY)
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": cfg.padded_vocab_size,
        "hidden_size": cfg.d_model,
        "state_size": cfg.d_state_total,
        "num_hidden_layers": cfg.n_layer,
        "layer_norm_epsilon": cfg.norm_eps,
        "expand": cfg.ssm.expand,
        "conv_kernel": cfg.ssm.d_conv,
        "use_bias": cfg.ssm.proj_bias,
        "use_conv_bias": cfg.ssm.conv_bias,
        "hidden_act": "silu",
        "initializer_range": cfg.initializer_range,
        "residual_in_fp32": cfg.residual_in_fp32,
        "time_step_rank": cfg.dt_rank,
        "time_step_min": cfg.ssm.dt_min,
        "time_step_max": cfg.ssm.dt_max,
        "time_step_floor": cfg.ssm.dt_init_floor,
        # An init-only setting; transformers 5 re-applies it to loaded out_proj weights, so keep it off.
        "rescale_prenorm_residual": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        **ids,
        CONFIG_KEY: cfg.to_dict(),
    }


def save_pretrained(model: MambaLM, out_dir: str | Path, special_ids: dict[str, int] | None = None,
                    max_shard_bytes: int | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by our :func:`from_pretrained` and by
    stock ``transformers.MambaForCausalLM.from_pretrained``. Past ``max_shard_bytes`` the weights are
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
    """Our ModelConfig from a config.json written by us, by transformers (MambaConfig), or by mamba_ssm."""
    if CONFIG_KEY in data:
        return ModelConfig.from_dict(data[CONFIG_KEY])
    if data.get("model_type") == hf_mamba2.MODEL_TYPE:
        return hf_mamba2.config_from_json(data)
    if data.get("model_type") == "mamba":  # a stock transformers checkpoint
        ssm = {
            "d_state": data.get("state_size", 16),
            "d_conv": data.get("conv_kernel", 4),
            "expand": data.get("expand", 2),
            "dt_rank": data.get("time_step_rank", "auto"),
            "conv_bias": data.get("use_conv_bias", True),
            "proj_bias": data.get("use_bias", False),
        }
        return ModelConfig.from_dict({
            "d_model": data["hidden_size"], "n_layer": data["num_hidden_layers"],
            # transformers' embedding has exactly vocab_size rows (its pad_vocab_size_multiple is unused)
            "vocab_size": data["vocab_size"], "pad_vocab_size_multiple": 1,
            "norm_eps": data.get("layer_norm_epsilon", 1e-5),
            "residual_in_fp32": data.get("residual_in_fp32", True), "ssm": ssm,
        })
    if "d_model" in data and "n_layer" in data:  # mamba_ssm's MambaConfig
        ssm_cfg = data.get("ssm_cfg") or {}
        if ssm_cfg.get("layer") == "Mamba2":
            return hf_mamba2.config_from_mamba_ssm(data)
        if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
            raise ConfigError(f"only Mamba-1 checkpoints are supported, got ssm_cfg.layer={ssm_cfg['layer']!r}")
        ssm = {k: ssm_cfg[k] for k in ("d_state", "d_conv", "expand", "dt_rank") if k in ssm_cfg}
        return ModelConfig.from_dict({
            "d_model": data["d_model"], "n_layer": data["n_layer"], "vocab_size": data["vocab_size"],
            "pad_vocab_size_multiple": data.get("pad_vocab_size_multiple", 8),
            "residual_in_fp32": data.get("residual_in_fp32", True), "ssm": ssm,
        })
    raise ConfigError("config.json is neither a polar-mamba, transformers Mamba nor mamba_ssm config")


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
                    device: str | torch.device = "cpu") -> MambaLM:
    """Load a MambaLM (or a TransformerLM saved by polar-mamba) from a folder written by
    :func:`save_pretrained`, a transformers or mamba_ssm
    Mamba checkpoint folder, or a Hub repo id (with optional revision)."""
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
    model.lm_head.weight = model.backbone.embeddings.weight  # assign=True replaced the tied tensor
    return model.to(device)
