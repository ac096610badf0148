"""Recency and over-smoothing diagnostics (Wang et al. 2025, Fig. 1, 5, 6) for Mamba and Transformer LMs.

* recency (Fig. 1): influence(l, d) = E ||∂(r·y_t)/∂x_{t-d}||, where x is layer l's mixer input, y its
  output, r ~ N(0, I) a fixed random projection (E_r ||r^T J||² = ||J||_F², so this tracks the Jacobian's
  size) and the expectation runs over the batch. For one Mamba channel with constant Δ it is
  ∝ exp(Δ·A·d) beyond the conv window (§3, eq. 3): the exponential recency the paper proves.
* over-smoothing (Fig. 5): mean over token pairs i < j of ||h_i - h_j||, divided by the mean ||h_i||, for
  the features after each mixer and after each block (the residual stream); 0 when all tokens are alike.
* A range (Fig. 6): for each learned state channel (d, n) of each Mamba layer, max_t A_t - min_t A_t with
  A_t = exp(Δ_t[d]·A[d, n]) over the positions of the inputs (Mamba-2: one A_t per head); its cumulative
  histogram shows how little the selective transition moves between "remember" (1) and "forget" (0), the
  gap polarization fills.

Inputs are random token sequences from the model's vocabulary (seeded). Each diagnostic is written as
JSON and PNG into the output folder; several targets are overlaid for comparison.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn


def load_target(target: str, step: int | None = None) -> nn.Module:
    """A fresh model from a YAML config's ``model`` section (any recipe: training, MQAR), an MQAR cell
    folder, or anything pretrain.export.load_model accepts (run directory, tag, exported folder)."""
    from models.build import build_model
    from models.config import ModelConfig

    path = Path(target)
    if path.is_file():
        from models.typed_config import load_yaml
        from pretrain.config import _expand_model_preset

        return build_model(ModelConfig.from_dict(_expand_model_preset(load_yaml(path)).get("model", {}))).eval()
    if (path / "model.pt").is_file():
        from eval.mqar import load_cell_model

        return load_cell_model(path)[0].cpu().eval()
    from pretrain.export import load_model

    return load_model(path, step).eval()


def _mixer_inputs(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's mixer input from one forward pass."""
    captured: list[torch.Tensor] = []
    hooks = [layer.mixer.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
             for layer in model.backbone.layers]
    try:
        with torch.no_grad():
            model(input_ids, return_logits=False)
    finally:
        for h in hooks:
            h.remove()
    return captured


def recency(model: nn.Module, input_ids: torch.Tensor, seed: int = 0) -> np.ndarray:
    """influence (n_layer, L): influence[l, d] for distance d from the last position t = L - 1."""
    L = input_ids.shape[1]
    out = []
    for layer, x in zip(model.backbone.layers, _mixer_inputs(model, input_ids)):
        x = x.clone().requires_grad_(True)
        y = layer.mixer(x)
        r = torch.randn(y.shape[0], y.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
        (grad,) = torch.autograd.grad((y[:, -1] * r).sum(), x)
        per_pos = grad.float().norm(dim=-1).mean(0)  # (L,), position s
        out.append(per_pos.flip(0)[:L].numpy())  # distance d = (L - 1) - s
    return np.stack(out)


def smoothness(h: torch.Tensor) -> float:
    """Mean pairwise ||h_i - h_j|| over token pairs i < j, over the mean ||h_i||; h (b, L, d)."""
    h = h.float()
    L = h.shape[1]
    dist = torch.cdist(h, h)
    pairs = dist.triu(1).sum((1, 2)) / (L * (L - 1) / 2)
    return float((pairs / h.norm(dim=-1).mean(1).clamp_min(1e-12)).mean())


@torch.no_grad()
def oversmoothing(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """Smoothness of the embeddings, and after each layer's mixer and block (residual stream)."""
    mixer, block = [], []
    hooks = []
    for layer in model.backbone.layers:
        hooks.append(layer.mixer.register_forward_hook(lambda m, a, out: mixer.append(smoothness(out))))
        # Blocks return (branch output, stream so far): their sum is the residual stream after the block.
        hooks.append(layer.register_forward_hook(lambda m, a, out: block.append(smoothness(out[0] + out[1]))))
    try:
        model(input_ids, return_logits=False)
    finally:
        for h in hooks:
            h.remove()
    return {"embedding": smoothness(model.backbone.embeddings(input_ids)), "mixer": mixer, "block": block}


@torch.no_grad()
def a_range(model: nn.Module, input_ids: torch.Tensor) -> list[list[float]] | None:
    """Per Mamba layer, max_t A_t - min_t A_t for every learned channel (d, n) and sequence, flattened;
    None for models without a selective SSM."""
    if not hasattr(model.backbone.layers[0].mixer, "A_log"):
        return None
    if hasattr(model.backbone.layers[0].mixer, "transitions"):  # Mamba-2: one A_t per head, computed by the mixer
        inputs = _mixer_inputs(model, input_ids)
        return [(At.amax(1) - At.amin(1)).flatten().tolist()
                for At in (layer.mixer.transitions(x) for layer, x in zip(model.backbone.layers, inputs))]
    captured: list[torch.Tensor] = []
    hooks = [layer.mixer.x_proj.register_forward_hook(lambda m, a, out: captured.append(out))
             for layer in model.backbone.layers]
    try:
        model(input_ids, return_logits=False)
    finally:
        for h in hooks:
            h.remove()
    ranges = []
    for layer, xp in zip(model.backbone.layers, captured):
        m = layer.mixer
        delta = torch.nn.functional.softplus(xp[..., : m.cfg.dt_rank].float() @ m.dt_proj.weight.float().t()
                                             + m.dt_proj.bias.float())  # (b, L, d_inner)
        At = torch.exp(delta[..., None] * -torch.exp(m.A_log.float()))  # (b, L, d_inner, N)
        ranges.append((At.amax(1) - At.amin(1)).flatten().tolist())
    return ranges


def diagnose(targets: dict[str, nn.Module], out: Path, batch: int = 4, seq_len: int = 128,
             seed: int = 0) -> dict[str, Any]:
    """Run the three diagnostics on every named model; write JSON + PNG into ``out``."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {"recency": {}, "oversmoothing": {}, "a_range": {}}
    for name, model in tqdm(targets.items(), desc="diagnose"):
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
        results["recency"][name] = recency(model, ids, seed).tolist()
        results["oversmoothing"][name] = oversmoothing(model, ids)
        ranges = a_range(model, ids)
        if ranges is not None:
            results["a_range"][name] = [np.histogram(r, bins=50, range=(0, 1))[0].cumsum().tolist() for r in ranges]
    for kind, data in results.items():
        (out / f"{kind}.json").write_text(json.dumps(data) + "\n")
    _plot(results, out)
    return results


def _per_layer(plt, per_model: dict[str, list], draw, xlabel: str, ylabel: str, suptitle: str):
    """One axis per layer (numbered from 1, the first block, as in the over-smoothing plot), every model
    overlaid in its own colour; ``draw(ax, curve, **style)`` plots one model's curve of that layer."""
    n = max(len(layers) for layers in per_model.values())
    cols = min(4, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.4 * cols, 2.7 * -(-n // cols)), squeeze=False,
                             sharex=True, sharey=True)
    colors = {name: f"C{i}" for i, name in enumerate(per_model)}
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis("off")
            continue
        for name, layers in per_model.items():
            if i < len(layers):
                draw(ax, layers[i], color=colors[name], label=name)
        ax.set_title(f"layer {i + 1}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(suptitle)
    return fig


def _plot(results: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = _per_layer(plt, results["recency"], lambda ax, curve, **kw: ax.semilogy(np.maximum(curve, 1e-30), **kw),
                     "distance t - s", "|∂y_t/∂x_s|", "recency: influence of a token at distance t - s")
    _save(fig, out / "recency.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, r in results["oversmoothing"].items():
        depth = range(1, len(r["block"]) + 1)
        line, = ax.plot(depth, r["block"], "o-", label=f"{name} (block)")
        ax.plot(depth, r["mixer"], "x--", color=line.get_color(), label=f"{name} (mixer)")
    ax.set(xlabel="layer", ylabel="pairwise difference / mean norm", title="over-smoothing")
    ax.locator_params(axis="x", integer=True)
    ax.legend(fontsize=7)
    _save(fig, out / "oversmoothing.png")

    if results["a_range"]:
        edges = np.linspace(0, 1, 51)[1:]
        fig = _per_layer(plt, results["a_range"],
                         lambda ax, cum, **kw: ax.plot(edges, np.asarray(cum) / cum[-1], **kw),
                         "A_max - A_min", "fraction of channels ≤ x", "range of the learned transition A_t")
        _save(fig, out / "a_range.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
