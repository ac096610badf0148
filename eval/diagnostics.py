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


def load_target(target: str, step: int | None = None, trust_pickle: bool = False) -> nn.Module:
    """A fresh model from a YAML config's ``model`` section (any recipe: training, MQAR), an MQAR cell
    folder, or anything eval.loading.load_any_model accepts (run directory, tag, export, any transformers
    causal LM folder or Hub id)."""
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
    from eval.loading import load_any_model

    return load_any_model(target, step, trust_pickle).eval()


def _hooked_forward(model: nn.Module, input_ids: torch.Tensor, hooks: list) -> None:
    """One forward pass with ``hooks`` (handles) removed afterwards, whatever happens."""
    try:
        model(input_ids, return_logits=False)
    finally:
        for h in hooks:
            h.remove()


def _replace_input(args: tuple, kwargs: dict, fn) -> tuple[tuple, dict]:
    """Apply ``fn`` to a module call's hidden-state input: the first positional argument, or
    ``hidden_states=`` (transformers' attention layers take it by keyword)."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}


def recency(model: nn.Module, input_ids: torch.Tensor, seed: int = 0) -> np.ndarray:
    """influence (n_layer, L): influence[l, d] for distance d from the last position t = L - 1.

    Forward hooks on each layer's mixer (any family, see eval.hf_targets.mixer_of) make its input a fresh
    leaf tensor and keep its output, so one forward pass gives every layer's own Jacobian y_t <- x_s."""
    from eval.hf_targets import decoder_layers, first_tensor, mixer_of

    leaves: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []

    def leaf(x: torch.Tensor) -> torch.Tensor:
        leaves.append(x.detach().requires_grad_(True))
        return leaves[-1]

    hooks = []
    for layer in decoder_layers(model):
        mixer = mixer_of(layer)
        hooks.append(mixer.register_forward_pre_hook(lambda m, a, k: _replace_input(a, k, leaf), with_kwargs=True))
        hooks.append(mixer.register_forward_hook(lambda m, a, out: outputs.append(first_tensor(out))))
    with torch.enable_grad():
        _hooked_forward(model, input_ids, hooks)
        curves = []
        for x, y in zip(leaves, outputs, strict=True):
            r = torch.randn(y.shape[0], y.shape[-1], generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
            (grad,) = torch.autograd.grad((y[:, -1] * r.to(y.device)).sum(), x, retain_graph=True)
            curves.append(grad.float().norm(dim=-1).mean(0).flip(0).cpu().numpy())  # distance d = (L-1) - s
    return np.stack(curves)


def smoothness(h: torch.Tensor) -> float:
    """Mean pairwise ||h_i - h_j|| over token pairs i < j, over the mean ||h_i||; h (b, L, d)."""
    h = h.float()
    L = h.shape[1]
    dist = torch.cdist(h, h)
    pairs = dist.triu(1).sum((1, 2)) / (L * (L - 1) / 2)
    return float((pairs / h.norm(dim=-1).mean(1).clamp_min(1e-12)).mean())


def _block_stream(model: nn.Module, out) -> torch.Tensor:
    """The residual stream after a block. Our blocks use the fused add-norm form and return (branch,
    stream so far), whose sum it is; a transformers layer returns the stream itself."""
    from eval.hf_targets import HFCausalLM, first_tensor

    return first_tensor(out) if isinstance(model, HFCausalLM) else out[0] + out[1]


@torch.no_grad()
def oversmoothing(model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
    """Smoothness of the embeddings, and after each layer's mixer and block (residual stream)."""
    from eval.hf_targets import decoder_layers, first_tensor, mixer_of

    mixer, block = [], []
    hooks = []
    for layer in decoder_layers(model):
        hooks.append(mixer_of(layer).register_forward_hook(
            lambda m, a, out: mixer.append(smoothness(first_tensor(out)))))
        hooks.append(layer.register_forward_hook(lambda m, a, out: block.append(smoothness(_block_stream(model, out)))))
    _hooked_forward(model, input_ids, hooks)
    embeddings = model.hf.get_input_embeddings() if hasattr(model, "hf") else model.backbone.embeddings
    return {"embedding": smoothness(embeddings(input_ids)), "mixer": mixer, "block": block}


@torch.no_grad()
def a_range(model: nn.Module, input_ids: torch.Tensor) -> list[list[float]] | None:
    """Per Mamba-1 layer (ours or transformers'), max_t A_t - min_t A_t for every learned channel (d, n) and
    sequence, flattened; None for models without a Mamba-1 selective SSM. Fixed channels (A_log = ±inf in
    an export of a polarized model) are left out."""
    from eval.hf_targets import decoder_layers, mixer_of

    mixers = [mixer_of(layer) for layer in decoder_layers(model)]
    if all(hasattr(m, "transitions") for m in mixers):  # our Mamba-2: one A_t per head, computed by the mixer
        inputs: list[torch.Tensor] = []
        _hooked_forward(model, input_ids, [m.register_forward_pre_hook(lambda mod, a: inputs.append(a[0]))
                                           for m in mixers])
        return [(At.amax(1) - At.amin(1)).flatten().tolist() for At in map(type(mixers[0]).transitions, mixers, inputs)]
    if not all(hasattr(m, "A_log") and hasattr(m, "x_proj") for m in mixers):
        return None
    captured: list[torch.Tensor] = []
    hooks = [m.x_proj.register_forward_hook(lambda mod, a, out: captured.append(out)) for m in mixers]
    _hooked_forward(model, input_ids, hooks)
    ranges = []
    for m, xp in zip(mixers, captured, strict=True):
        rank = m.dt_proj.in_features
        delta = torch.nn.functional.softplus(xp[..., :rank].float() @ m.dt_proj.weight.float().t()
                                             + m.dt_proj.bias.float())  # (b, L, d_inner)
        a_log = m.A_log.float()
        learned = a_log[:, torch.isfinite(a_log).all(0)]
        At = torch.exp(delta[..., None] * -torch.exp(learned))  # (b, L, d_inner, N)
        ranges.append((At.amax(1) - At.amin(1)).flatten().tolist())
    return ranges


def diagnose(targets: dict[str, nn.Module], out: Path, batch: int = 4, seq_len: int = 128,
             seed: int = 0) -> dict[str, Any]:
    """Run the three diagnostics on every named model; write JSON + PNG into the folder ``out``, as one output
    (tokenizer/atomic.py: whole or not at all)."""
    from tqdm import tqdm

    from tokenizer.atomic import write_atomically

    results: dict[str, dict[str, Any]] = {"recency": {}, "oversmoothing": {}, "a_range": {}}
    for name, model in tqdm(targets.items(), desc="diagnose"):
        device = next(model.parameters()).device
        ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
        ids = ids.to(device)
        results["recency"][name] = recency(model, ids, seed).tolist()
        results["oversmoothing"][name] = oversmoothing(model, ids)
        ranges = a_range(model, ids)
        if ranges is not None:
            results["a_range"][name] = [np.histogram(r, bins=50, range=(0, 1))[0].cumsum().tolist() for r in ranges]

    def fill(tmp: Path) -> None:
        for kind, data in results.items():
            (tmp / f"{kind}.json").write_text(json.dumps(data) + "\n")
        _plot(results, tmp)

    write_atomically(out, fill)
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
