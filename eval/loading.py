"""Resolve a model reference to the model and the tokenizer every evaluation uses.

A reference is one of: a run directory (latest checkpoint, or ``step``), a checkpoint tag folder, our
exported folder, a transformers/mamba_ssm Mamba folder (both load into our MambaLM: same weights, our
kernels, constant-memory chunked prefill), any other transformers causal LM folder (GPT-NeoX/Pythia,
Llama family, Mamba-2, ...: wrapped by :class:`eval.hf_targets.HFCausalLM`), or a Hub id ``ORG/NAME`` of
any of these (downloaded into the Hub cache).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from pretrain import checkpoint as ckpt
from pretrain.export import checkpoint_location, copy_tokenizer, load_model
from tokenizer.tokenizer import MODEL_FILE, Tokenizer

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_folder(path: str | Path, step: int | None = None) -> Path:
    """``path`` itself when local (or a run directory); a Hub id is downloaded and its cache folder returned."""
    p = Path(path)
    if p.exists():
        return p
    from models.hf import resolve_folder

    return resolve_folder(str(path))


def load_any_model(path: str | Path, step: int | None = None) -> nn.Module:
    """Our MambaLM/TransformerLM, or a transformers causal LM behind our interface (see the module docstring)."""
    from eval.hf_targets import is_transformers_folder, load_hf_causal_lm

    folder = model_folder(path, step)
    if step is None and is_transformers_folder(folder):
        return load_hf_causal_lm(folder)
    return load_model(folder, step)


def our_tokenizer_path(folder: Path, step: int | None = None) -> Path | None:
    """Our tokenizer for a local model folder: ``tokenizer.model`` beside it, or the one its run config names."""
    if (folder / MODEL_FILE).is_file():
        return folder
    loc = checkpoint_location(folder, step)
    tok = loc and ckpt.read_state(*loc)["config"]["data"].get("tokenizer")
    return Path(tok) if tok else None


def find_tokenizer(path: str | Path, step: int | None = None):
    """Our ``tokenizer.model`` beside an export, the one named by a checkpoint's config, or the folder's
    transformers tokenizer (``tokenizer.json``)."""
    p = model_folder(path, step)
    ours = our_tokenizer_path(p, step)
    if ours:
        return Tokenizer.load(ours)
    if any((p / f).is_file() for f in HF_TOKENIZER_FILES):
        from eval.hf_targets import load_hf_tokenizer

        return load_hf_tokenizer(p)
    raise FileNotFoundError(f"no tokenizer for {path}: neither {MODEL_FILE} / tokenizer.json beside it nor "
                            "data.tokenizer in its run config; pass tokenizer=PATH / --tokenizer PATH")


def load_tokenizer(path: str | Path):
    """A tokenizer given explicitly: our tokenizer folder / .model file, or a transformers tokenizer folder."""
    p = Path(path)
    if (p / MODEL_FILE).is_file() or p.is_file():
        return Tokenizer.load(p)
    from eval.hf_targets import load_hf_tokenizer

    return load_hf_tokenizer(p)


def load_for_eval(path: str | Path, step: int | None = None, tokenizer: str | Path | None = None,
                  device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                  ) -> tuple[nn.Module, Tokenizer]:
    """(model in eval mode on ``device`` — CUDA when available — , tokenizer)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_any_model(path, step).to(device=device, dtype=dtype).eval()
    tok = load_tokenizer(tokenizer) if tokenizer else find_tokenizer(path, step)
    return model, tok


def hf_tokenizer_folder(path: str | Path, step: int | None = None) -> Path | None:
    """A folder ``transformers.AutoTokenizer`` loads with our exact ids, for tools that measure prompts in
    tokens themselves (lm-eval's RULER tasks): a local reference that has ``tokenizer.json`` itself, else a
    copy of our tokenizer with its Hugging Face files, written once into ~/.cache/polar-mamba/hf-tokenizers/
    (keyed by the model file's hash). None when the reference is not local or names no tokenizer."""
    p = Path(path)
    if not p.exists():
        return None
    if (p / HF_TOKENIZER_FILES[0]).is_file():
        return p
    ours = our_tokenizer_path(p, step)
    if ours is None:
        return None
    tok = Tokenizer.load(ours)
    out = Path.home() / ".cache" / "polar-mamba" / "hf-tokenizers" / tok.fingerprint[:16]
    if not (out / HF_TOKENIZER_FILES[0]).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        copy_tokenizer(ours, tmp)
        try:
            os.replace(tmp, out)  # atomic: a concurrent writer's identical copy may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
