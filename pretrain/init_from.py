"""``model.init_from``: a new run's first weights from a trained checkpoint instead of random ones.

Any model our loaders read is a source (pretrain/export.py's :func:`load_model`: a run directory at its latest
or ``step``, a tag folder, an export, a stock transformers Mamba / Mamba-2 / Llama folder with a tied or untied
head, a mamba_ssm folder; models/hf.py's Hub ids, offline a one-line error). The recipe must describe the
source's model: the same architecture and sizes, the same padded vocabulary (set ``pad_vocab_size_multiple``
so the embedding has the source's rows), the same tokenizer when the source records one; it may differ in
init-only fields (``ModelConfig.INIT_ONLY``) and add polar channels, which models/polarize.py adds without
changing the function. Any other difference is refused in one line naming it, before the run directory is
written. The optimizer and schedule are the recipe's, fresh. A source whose weights are pickles only
(pytorch_model.bin) is refused unless ``model.init_from.trust_pickle: true`` (models/hf.py).

Provenance: the path, the revision read (a run's checkpoint tag; a Hub snapshot's commit) and the sha256 of the
weights as loaded (:func:`weights_sha256`, independent of the file format) fill ``model.init_from``, so
``config.yaml``, every checkpoint's ``polar_state.json``, exports' config.json and the model card carry them.
A resumed run never reads the source again: it takes the provenance its checkpoint recorded
(:func:`adopt_recorded_source`) and its weights from its own checkpoint.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from models.config import InitFromConfig, ModelConfig
from models.hf import from_pretrained, resolve_folder
from models.polarize import polarize_state_dict
from models.typed_config import ConfigError, differences
from pretrain.export import checkpoint_location, load_checkpoint_model


def weights_sha256(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order (name, dtype, shape, bytes): the same for a run's checkpoint and
    its export, whatever files hold them."""
    h = hashlib.sha256()
    for name in sorted(sd):
        t = sd[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _load(init: InitFromConfig) -> tuple[torch.nn.Module, str | None, str | None]:
    """(model, revision read, tokenizer fingerprint when the source records one)."""
    loc = checkpoint_location(init.path, init.step)
    if loc is not None:
        model, state = load_checkpoint_model(*loc)
        return model, loc[1], state.get("tokenizer_fingerprint")
    if init.step is not None:
        raise ConfigError(f"model.init_from.step: {init.path} has no checkpoints (step needs a run directory)")
    folder = resolve_folder(init.path, init.revision)
    # a Hub download is a snapshot folder named by its commit
    revision = folder.name if not Path(init.path).exists() else init.revision
    return from_pretrained(folder, trust_pickle=init.trust_pickle), revision, None


def _aligned(src: ModelConfig, dst: ModelConfig, where: str) -> ModelConfig:
    """``dst`` with the source's polar channels, after refusing any difference but init-only fields, polar
    channels and the vocabulary padding (which must give the source's rows)."""
    ignore = {*type(dst).INIT_ONLY, "polarize", "vocab_size", "pad_vocab_size_multiple"}
    if type(src) is not type(dst):  # another architecture
        raise ConfigError(f"model.arch: {where} is {src.arch!r}, the config asks for {dst.arch!r}")
    for key, was, now in differences(src.to_dict(), dst.to_dict()):
        if key not in ignore and key.split(".")[0] not in ignore:
            raise ConfigError(f"model.{key}: {where} has {was!r}, the config asks for {now!r} (model.init_from "
                              "needs the source's model; only polar channels may be added)")
    if dst.padded_vocab_size != src.padded_vocab_size or dst.vocab_size > src.padded_vocab_size:
        raise ConfigError(f"model.vocab_size: {where} has {src.padded_vocab_size} embedding rows, the config "
                          f"{dst.vocab_size} padded to {dst.padded_vocab_size}: use the source's tokenizer and "
                          "set model.pad_vocab_size_multiple so the padded sizes agree")
    return replace(dst, polarize=src.polarize) if hasattr(src, "polarize") else dst


def initial_weights(cfg: ModelConfig, tokenizer_fingerprint: str | None, seed: int
                    ) -> tuple[dict[str, torch.Tensor], InitFromConfig]:
    """The first weights of a ``cfg`` model from ``cfg.init_from`` (``seed`` draws new polar channels' B rows),
    and the provenance to record."""
    init = cfg.init_from
    model, revision, fingerprint = _load(init)
    where = f"the source {init.path}"
    if fingerprint and tokenizer_fingerprint and fingerprint != tokenizer_fingerprint:
        raise ConfigError(f"data.tokenizer: {where} was trained with tokenizer {fingerprint}, the data has "
                          f"{tokenizer_fingerprint}: prepare the data with the source's tokenizer")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    sha = weights_sha256(sd)
    if init.sha256 and init.sha256 != sha:
        raise ConfigError(f"model.init_from.sha256: {where} has weights {sha}, the config pins {init.sha256}")
    src = _aligned(model.config, cfg, where)
    sd = polarize_state_dict(sd, src, cfg, torch.Generator().manual_seed(seed))
    return sd, replace(init, revision=revision, sha256=sha)


def adopt_recorded_source(cfg: ModelConfig, saved_model: dict[str, Any]) -> None:
    """On resume: the provenance the checkpoint recorded, when the recipe names the same source (otherwise the
    resume check names the difference)."""
    saved = ModelConfig.from_dict(saved_model).init_from
    mine = cfg.init_from
    if (saved.path, saved.step) == (mine.path, mine.step) and mine.sha256 in (None, saved.sha256):
        cfg.init_from = saved
