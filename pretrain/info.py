"""What `polar info` prints: library versions, the kernel backend each op will use, and every model preset's size."""

from __future__ import annotations

import importlib.metadata
import platform


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def preset_parameter_counts() -> dict[str, int]:
    """Parameters of every preset, counted on the meta device (no memory, exact shapes)."""
    import torch

    from models import PRESETS, ModelConfig, build_model

    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            counts[name] = build_model(ModelConfig.preset(name)).num_parameters()
    return counts


def print_info() -> None:
    import torch

    from kernels import dispatch
    from models import ModelConfig
    from models.registry import registered_archs

    print("versions")
    print(f"  python         {platform.python_version()}")
    for dist in ("polar-mamba", "torch", "transformers", "deepspeed", "triton", "mamba-ssm", "causal-conv1d"):
        print(f"  {dist:<14} {_version(dist)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device           {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}")
    print(f"kernel backends ({device})")
    for op, choice in dispatch.describe(device).items():
        print(f"  {op:<16} {choice}")
    print("model presets (columns per architecture)")
    counts = preset_parameter_counts()
    for spec in registered_archs():
        configs = {name: ModelConfig.preset(name) for name in spec.presets}
        extra = {name: spec.info_columns(cfg) for name, cfg in configs.items()}
        keys = list(next(iter(extra.values()), {}))
        print(f"  {spec.name} ({spec.title})")
        print(f"    {'name':<18} {'params':>14} {'d_model':>8} {'n_layer':>8}" + "".join(f" {k:>12}" for k in keys))
        for name, cfg in configs.items():
            print(f"    {name:<18} {counts[name]:>14,} {cfg.d_model:>8} {cfg.n_layer:>8}"
                  + "".join(f" {extra[name][k]:>12}" for k in keys))

