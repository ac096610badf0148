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
from pretrain.export import checkpoint_location, load_model
from tokenizer import load_tokenizer
from tokenizer.hf_tokenizer import HF_FILES, HFTokenizer
from tokenizer.tokenizer import MODEL_FILE, Tokenizer


def model_folder(path: str | Path, step: int | None = None) -> Path:
    """``path`` itself when local (or a run directory); a Hub id is downloaded and its cache folder returned."""
    p = Path(path)
    if p.exists():
        return p
    from models.hf import resolve_folder

    return resolve_folder(str(path))


def load_any_model(path: str | Path, step: int | None = None, trust_pickle: bool = False) -> nn.Module:
    """Our MambaLM/TransformerLM, or a transformers causal LM behind our interface (see the module docstring);
    pickle-only weights only with ``trust_pickle`` (models/hf.py)."""
    from eval.hf_targets import is_transformers_folder, load_hf_causal_lm

    folder = model_folder(path, step)
    if step is None and is_transformers_folder(folder):
        return load_hf_causal_lm(folder, trust_pickle)
    return load_model(folder, step, trust_pickle)


def tokenizer_reference(folder: Path, step: int | None = None) -> Path | None:
    """The tokenizer of a local model folder (any kind: tokenizer/load.py): the files beside it, or the one its
    run config names."""
    if any((folder / f).is_file() for f in (MODEL_FILE, *HF_FILES)):
        return folder
    loc = checkpoint_location(folder, step)
    tok = loc and ckpt.read_state(*loc)["config"]["data"].get("tokenizer")
    return Path(tok) if tok else None


def find_tokenizer(path: str | Path, step: int | None = None):
    """The tokenizer files beside an export or transformers folder (any kind: tokenizer/load.py), else the one
    named by a checkpoint's config."""
    ref = tokenizer_reference(model_folder(path, step), step)
    if ref is not None:
        return load_tokenizer(ref)
    raise FileNotFoundError(f"no tokenizer for {path}: neither {MODEL_FILE} / tokenizer.json beside it nor "
                            "data.tokenizer in its run config; pass tokenizer=PATH / --tokenizer PATH")


def load_for_eval(path: str | Path, step: int | None = None, tokenizer: str | Path | None = None,
                  device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                  trust_pickle: bool = False) -> tuple[nn.Module, Tokenizer | HFTokenizer]:
    """(model in eval mode on ``device`` — CUDA when available — , tokenizer)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_any_model(path, step, trust_pickle).to(device=device, dtype=dtype).eval()
    tok = load_tokenizer(tokenizer) if tokenizer else find_tokenizer(path, step)
    return model, tok


def hf_tokenizer_folder(path: str | Path, step: int | None = None) -> Path | None:
    """A folder ``transformers.AutoTokenizer`` loads with our exact ids, for tools that measure prompts in
    tokens themselves (lm-eval's RULER tasks): a local reference that has ``tokenizer.json`` itself, else a
    copy of the run's tokenizer (any kind) with its Hugging Face files, written once into
    ~/.cache/polar-mamba/hf-tokenizers/ (keyed by its fingerprint). None when the reference is not local or
    names no tokenizer."""
    p = Path(path)
    if not p.exists():
        return None
    if (p / HF_FILES[0]).is_file():
        return p
    ref = tokenizer_reference(p, step)
    if ref is None:
        return None
    tok = load_tokenizer(ref)
    out = Path.home() / ".cache" / "polar-mamba" / "hf-tokenizers" / tok.fingerprint[:16]
    if not (out / HF_FILES[0]).is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)  # atomic: a concurrent writer's identical copy may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
