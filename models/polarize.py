"""Function-preserving polarization: give a trained SSM LM the polar channels a config asks for (Wang et al.
2025, §4: ``polarize.ones`` channels with A_t ≡ 1, ``polarize.zeros`` with A_t ≡ 0) so that it computes
exactly what it computed before, yet the new channels learn.

The choice. A new channel adds C_t·h_t to y, with h_t driven by B_t·x_t. Its **C rows start at zero**, so the
added term is exactly 0 whatever h_t is (the scans add the polar channels' term to the learned channels' y in
closed form, and y + 0 = y), and the logits equal the source's. Its **B rows start like the learned
channels'** (random, on the RMS scale of this layer's trained B rows; Mamba-2 also gives each new channel its
group's mean conv filter): then h_t ≠ 0, so dL/dC = (dL/dy)·h_t ≠ 0 and C moves at the first step; B's
gradient is ∝ C, so B follows once C has moved. Zeroing B as well would leave both gradients 0 forever (a
saddle, as for two consecutive zero layers); the reverse (zero B, random C) also preserves the function, but
its first gradient goes to B through an arbitrary random readout, whereas ours reads out states that already
carry this layer's kind of input, leaving to training only how to read them.

The architecture supplies the tensor layout (``ArchSpec.add_polar_channels``: Mamba-1's x_proj, Mamba-2's
in_proj and conv1d per B/C group); everything else is copied unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.build import build_model
from models.config import ModelConfig
from models.registry import get_arch
from models.typed_config import ConfigError, differences


def check_polarizable(src: ModelConfig, dst: ModelConfig) -> None:
    """Refuse (one line naming the field) a ``dst`` that differs from ``src`` other than by more polar channels."""
    if type(src) is not type(dst):  # another architecture
        raise ConfigError(f"model.arch: the source is {src.arch!r}, the config asks for {dst.arch!r}")
    a, b = src.to_dict(), dst.to_dict()
    for key, was, now in differences({k: v for k, v in a.items() if k != "polarize"},
                                     {k: v for k, v in b.items() if k != "polarize"}, "model."):
        raise ConfigError(f"{key}: the source has {was!r}, the config asks for {now!r} (only polarize.ones/zeros "
                          "may differ)")
    if "polarize" not in a:
        return
    (sp, dp), spec = (a["polarize"], b["polarize"]), get_arch(src.arch)
    for n in ("ones", "zeros"):
        if dp[n] < sp[n]:
            raise ConfigError(f"model.polarize.{n}: the source has {sp[n]} such channels, the config asks for "
                              f"{dp[n]} (channels can be added, not removed)")
    if sp["zeros"] and sp["zero_mode"] != dp["zero_mode"]:
        raise ConfigError(f"model.polarize.zero_mode: the source's zeros channels are {sp['zero_mode']!r}, the "
                          f"config asks for {dp['zero_mode']!r}")
    if sp != dp and spec.add_polar_channels is None:
        raise ConfigError(f"model.polarize: architecture {src.arch!r} cannot add polar channels to a trained model")


def polarize_state_dict(sd: dict[str, torch.Tensor], src: ModelConfig, dst: ModelConfig,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """A ``dst`` state dict computing what ``sd`` (a ``src`` model's) computes; ``generator`` draws the new B rows."""
    check_polarizable(src, dst)
    if src.to_dict() == dst.to_dict():
        return dict(sd)
    return get_arch(src.arch).add_polar_channels(sd, src, dst, generator or torch.Generator().manual_seed(0))


def polarize(model: nn.Module, dst: ModelConfig, generator: torch.Generator | None = None) -> nn.Module:
    """A new ``dst`` model (on ``model``'s device, in its dtype) whose logits are ``model``'s, with ``dst``'s extra
    polar channels."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = build_model(dst).to(next(model.parameters()))
    out.load_state_dict(polarize_state_dict(sd, model.config, dst, generator))
    return out
