"""Resolve a model reference (run directory [+ step], checkpoint tag folder, exported folder) to the model
and the tokenizer it was trained with, for every evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from pretrain import checkpoint as ckpt
from pretrain.export import checkpoint_location, load_model
from tokenizer.tokenizer import MODEL_FILE, Tokenizer


def find_tokenizer(path: str | Path, step: int | None = None) -> Tokenizer:
    """The tokenizer beside an export (``tokenizer.model``) or the one named by a checkpoint's config."""
    p = Path(path)
    if (p / MODEL_FILE).is_file():
        return Tokenizer.load(p)
    loc = checkpoint_location(p, step)
    tok = loc and ckpt.read_state(*loc)["config"]["data"].get("tokenizer")
    if not tok:
        raise FileNotFoundError(f"no tokenizer for {path}: neither {MODEL_FILE} beside it nor data.tokenizer in "
                                "its run config; pass tokenizer=PATH / --tokenizer PATH")
    return Tokenizer.load(tok)


def load_for_eval(path: str | Path, step: int | None = None, tokenizer: str | Path | None = None,
                  device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                  ) -> tuple[torch.nn.Module, Tokenizer]:
    """(model in eval mode on ``device`` — CUDA when available — , tokenizer)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(path, step).to(device=device, dtype=dtype).eval()
    tok = Tokenizer.load(tokenizer) if tokenizer else find_tokenizer(path, step)
    return model, tok
