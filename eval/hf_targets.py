"""Any transformers causal LM (Mamba, Mamba-2, GPT-NeoX/Pythia, Llama family, ...) as an evaluation target.

:class:`HFCausalLM` gives a ``transformers`` ``AutoModelForCausalLM`` the interface our own LMs offer to
evaluation code (``forward(ids, labels=, states=, return_logits=)`` -> LMOutput, ``backbone(ids, states)``,
``lm_head``, ``new_states`` / ``step`` from :class:`models.generation.Generation`), so NIAH, lm-eval, the
recency probe and the diagnostics drive it unchanged. Its inference state is the model's own cache.

Long prompts prefill in chunks when the model's cache continues a multi-token chunk exactly (attention
KV caches do); whether it does is measured once at load by comparing a chunked and a one-pass forward on
a few random tokens, not assumed per family (transformers 5.x: attention caches and Mamba-2 continue;
its Mamba-1 mixer restarts the scan from zero on a multi-token chunk, only single-token steps use the
cached SSM state). A model that does not continue reruns the whole prefix in one pass per chunk: correct,
with memory growing with the prompt. (eval.loading loads Mamba-1 folders into our own MambaLM, which does.)

:func:`decoder_layers` and :func:`mixer_of` find the per-layer modules the diagnostics hook (recency and
over-smoothing are measured on each layer's mixer input and output by forward hooks, for any family).
Their tokenizers load through tokenizer.load_tokenizer (tokenizer/hf_tokenizer.py: our Tokenizer's interface).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.generation import Generation
from models.lm import LMOutput

# Where the token mixer lives inside a decoder layer, by the attribute names transformers and we use.
MIXER_NAMES = ("mixer", "self_attn", "attention", "attn", "mamba", "self_attention")
_CACHE_ARGS = ("cache", "past_key_values", "cache_params")  # the cache keyword, newest transformers first


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of any LM: the first ModuleList (in module order) of modules of one class."""
    root = model.hf if isinstance(model, HFCausalLM) else model
    for _, mod in root.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            return list(mod)
    raise ValueError(f"{type(root).__name__} has no list of decoder layers: not a decoder-only LM")


def mixer_of(layer: nn.Module) -> nn.Module:
    """The layer's token mixer (SSM or attention); the whole layer when it names none of MIXER_NAMES."""
    return next((getattr(layer, n) for n in MIXER_NAMES if isinstance(getattr(layer, n, None), nn.Module)), layer)


def first_tensor(out) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple/ModelOutput."""
    return out if isinstance(out, torch.Tensor) else out[0]


class HFState:
    """One batch's inference state: the model's cache, plus the tokens seen when the cache cannot continue a
    multi-token chunk (then such a chunk reruns the prefix)."""

    def __init__(self, keep_ids: bool):
        self.cache = None
        self.keep_ids = keep_ids
        self.ids: torch.Tensor | None = None  # (b, seen) when keep_ids
        self.batch = 0

    def repeat(self, n: int) -> HFState:
        """Each sequence's state n times in a row (to score n continuations of one prompt)."""
        new = HFState(self.keep_ids)
        new.batch = self.batch * n
        if self.cache is not None:
            new.cache = copy.deepcopy(self.cache)
            new.cache.reorder_cache(torch.arange(self.batch).repeat_interleave(n))
        if self.ids is not None:
            new.ids = self.ids.repeat_interleave(n, 0)
        return new


class HFCausalLM(Generation, nn.Module):
    """A transformers causal LM behind our LMs' evaluation interface (see the module docstring)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model.eval()
        self.config = hf_model.config  # .vocab_size, as ours
        self.base = hf_model.base_model
        self.lm_head = hf_model.get_output_embeddings()
        params = inspect.signature(self.base.forward).parameters
        self._cache_arg = next((a for a in _CACHE_ARGS if a in params), None)
        self.chunked_prefill = self._cache_arg is not None and self._continues_chunks()

    @torch.no_grad()
    def _continues_chunks(self, n: int = 24, split: int = 7) -> bool:
        """Does a cached forward of tokens [split, n) after [0, split) match one pass over [0, n)?"""
        dev = self.lm_head.weight.device
        ids = torch.randint(0, self.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0)).to(dev)
        whole = self.base(ids).last_hidden_state[:, split:].float()
        state = HFState(keep_ids=False)
        self._run(ids[:, :split], state)
        part = self._run(ids[:, split:], state).float()
        return bool(torch.allclose(part, whole, atol=1e-4 * (1 + whole.abs().max().item()), rtol=1e-3))

    def _run(self, ids: torch.Tensor, state: HFState) -> torch.Tensor:
        state.batch = ids.shape[0]
        if self._cache_arg is None:  # a model without a cache: every call runs the whole sequence
            return self.base(ids).last_hidden_state
        out = self.base(ids, use_cache=True, **{self._cache_arg: state.cache})
        state.cache = next(v for k in _CACHE_ARGS if (v := out.get(k)) is not None)
        return out.last_hidden_state

    def new_states(self, batch: int, device=None, dtype=None) -> list[HFState]:
        return [HFState(keep_ids=not self.chunked_prefill)]

    def backbone(self, input_ids: torch.Tensor, states: list[HFState] | None = None) -> torch.Tensor:
        """Final hidden states (b, L, d) of ``input_ids``; with ``states``, continuing them."""
        if states is None:
            return self.base(input_ids, use_cache=False).last_hidden_state
        (state,) = states
        prefix = state.ids
        if prefix is not None and (input_ids.shape[1] > 1 or self._cache_arg is None):  # rerun the prefix
            state.cache = None
            hidden = self._run(torch.cat([prefix, input_ids], 1), state)[:, prefix.shape[1]:]
        else:
            hidden = self._run(input_ids, state)
        if state.keep_ids:
            state.ids = input_ids if prefix is None else torch.cat([prefix, input_ids], 1)
        return hidden

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                states: list[HFState] | None = None, return_logits: bool = True) -> LMOutput:
        """As MambaLM.forward: ``labels`` already shifted, -100 ignored."""
        hidden = self.backbone(input_ids, states)
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return LMOutput(logits=logits if return_logits else None, loss=loss)


def check_positions(model: nn.Module, tokens: int, what: str) -> None:
    """Refuse a sequence longer than a transformers model's position table (``max_position_embeddings``):
    past it the model is undefined (learned positions) or untrained (rotary), and the reason is not the
    one the evaluation measures. Our own models and models without such a limit pass."""
    limit = getattr(model.config, "max_position_embeddings", None) if isinstance(model, HFCausalLM) else None
    if limit and tokens > limit:
        raise ValueError(f"{what}: {tokens} tokens exceed the model's {limit} positions (max_position_embeddings); "
                         f"use lengths up to {limit}")


def is_transformers_folder(folder: Path) -> bool:
    """A folder with a transformers config.json that our own loader does not read (see eval.loading)."""
    import json

    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    data = json.loads(cfg.read_text())
    from models.hf import CONFIG_KEY

    return CONFIG_KEY not in data and data.get("model_type") not in (None, "mamba")


def load_hf_causal_lm(folder: str | Path, trust_pickle: bool = False) -> HFCausalLM:
    """A transformers causal LM: safetensors weights, or pickles with ``trust_pickle`` (models/hf.py); never
    remote code."""
    from transformers import AutoModelForCausalLM

    from models.hf import refuse_untrusted_pickle

    refuse_untrusted_pickle(Path(folder), trust_pickle)
    return HFCausalLM(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                           use_safetensors=None if trust_pickle else True))
