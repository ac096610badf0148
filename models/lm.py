"""The one LM skeleton every architecture builds on: embedding, a backbone of blocks passing (hidden,
residual), final norm, LM head (tied to the embedding or its own matrix, ``model.tie_embeddings``), the
chunked loss, decoding (:mod:`models.generation`), parameter counting, the parameters ZeRO-3 must gather,
and the Hugging Face-style hub methods (:mod:`models.hub`).

An architecture contributes a block (``CausalLM.block``, built from the config) whose ``.mixer`` is its
sequence-mixing layer (a :class:`Mixer`: inference state, init, kernel-read parameters); most use
:class:`MixerBlock`, the pre-norm residual block with one mixer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn

from kernels import dispatch
from models.generation import Generation
from models.hub import HubMixin
from models.layers import AddLayerNorm, RMSNorm


class LMOutput(NamedTuple):
    """A named tuple, so wrappers that hook module outputs (ZeRO-3's backward gathering) see its tensors."""

    logits: torch.Tensor | None  # (b, L, padded_vocab); None when not asked for
    loss: torch.Tensor | None = None


class Mixer(nn.Module):
    """A sequence-mixing layer: ``forward(hidden (b, L, d_model), state=None)``; with a state from
    :meth:`new_state` the input continues it (one token or a chunk) and leaves the new state there. In a
    :class:`MixerBlock` it also brings its init, ``reset_parameters()``. A mixer with ``document_resets``
    also takes ``seq_idx=`` (b, L) in training and mixes nothing across packed documents
    (:mod:`kernels.documents`; ``data.document_boundaries: reset``)."""

    document_resets: ClassVar[bool] = False

    def new_state(self, batch: int, device: torch.device, dtype: torch.dtype) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no inference state: define new_state")

    def kernel_parameters(self) -> list[nn.Parameter]:
        """Parameters forward hands to kernels directly instead of calling the module that owns them."""
        return []


class MixerBlock(nn.Module):
    """Pre-norm residual block in mamba_ssm's fused add-norm form: it takes (hidden, residual), adds them
    into the new residual stream, and returns (mixer(norm(stream)), stream). The stream is fp32 when
    ``residual_in_fp32``, else it keeps the dtype hidden + residual would have."""

    def __init__(self, cfg: Any, mixer: Callable[[Any], Mixer]):
        super().__init__()
        self.residual_in_fp32 = cfg.residual_in_fp32
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer(cfg)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, state: Any = None,
                **documents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed, stream = self.norm(hidden, residual)
        if not self.residual_in_fp32:
            stream = stream.to(hidden.dtype if residual is None else torch.promote_types(hidden.dtype, residual.dtype))
        return self.mixer(normed, state, **documents), stream

    def reset_parameters(self) -> None:
        self.mixer.reset_parameters()


class Backbone(nn.Module):
    """Embedding, ``n_layer`` blocks passing (hidden, residual), final norm."""

    def __init__(self, cfg: Any, block: Callable[[Any], nn.Module]):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = (AddLayerNorm if cfg.final_norm == "layernorm" else RMSNorm)(cfg.d_model, cfg.norm_eps)

    def forward(self, input_ids: torch.Tensor, states: list | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalised hidden states (b, L, d_model); with ``states`` (one per layer), continuing them; with
        ``seq_idx`` (b, L), resetting at packed documents' boundaries (only passed on when given, so a block
        that has no resets keeps its plain signature)."""
        hidden, residual = self.embeddings(input_ids), None
        documents = {} if seq_idx is None else {"seq_idx": seq_idx}
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, None if states is None else states[i], **documents)
        return self.norm_f(hidden, residual)[0]


class CausalLM(Generation, HubMixin, nn.Module):
    """A causal LM over ``block`` layers (vocab padded to ``pad_vocab_size_multiple``). Subclasses set ``block``:
    a callable building one layer (with ``.mixer`` and ``reset_parameters()``) from the config."""

    block: ClassVar[Callable[[Any], nn.Module]]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not hasattr(cls, "block"):
            raise TypeError(f"{cls.__name__} must set block (a callable building one layer from the config)")

    def __init__(self, cfg: Any):
        super().__init__()
        self.config = cfg
        self.backbone = Backbone(cfg, type(self).block)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.tie_head()
        self.reset_parameters()

    def tie_head(self) -> None:
        """Share the embedding with the head when ``tie_embeddings`` (again after loading with assign=True)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) embedding (and untied head, as transformers), then each layer's own init."""
        std = self.config.initializer_range
        nn.init.normal_(self.backbone.embeddings.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        for layer in self.backbone.layers:
            layer.reset_parameters()

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once; ``exclude_embeddings`` leaves out the input embedding)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.backbone.embeddings.weight.numel() if exclude_embeddings else n

    def borrowed_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where a module's forward reads a parameter it does not own: the LM computes
        the loss from the head weight, and mixers hand some weights to kernels directly. Sharded data
        parallelism (ZeRO-3) must gather these around that forward."""
        pairs = [(self, self.lm_head.weight)]
        for layer in self.backbone.layers:
            pairs += [(layer.mixer, p) for p in layer.mixer.kernel_parameters()]
        return pairs

    @property
    def document_resets(self) -> bool:
        """Whether every layer can reset at document boundaries (``forward(..., seq_idx=)``)."""
        return all(type(layer.mixer).document_resets for layer in self.backbone.layers)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                states: list | None = None, return_logits: bool = True,
                seq_idx: torch.Tensor | None = None) -> LMOutput:
        """``labels[b, t]`` is the token that should follow ``input_ids[b, t]`` (already shifted, as
        nanoGPT's targets); -100 is ignored. The loss is the mean cross-entropy in fp32, computed chunk by
        chunk from the hidden states so the (tokens x vocab) logits are never materialised for it; they
        are only computed when ``return_logits`` (training passes False). With ``states`` (from
        ``new_states``) the input continues them and leaves them updated. ``seq_idx`` (b, L), the packed
        document of each position, makes every layer start each document from a zero state (training with
        ``data.document_boundaries: reset``)."""
        if seq_idx is not None and not self.document_resets:
            raise ValueError(f"{type(self).__name__} cannot reset at document boundaries: use "
                             "data.document_boundaries: carry")
        hidden = self.backbone(input_ids, states, seq_idx)
        loss = None
        if labels is not None:
            loss = dispatch.linear_cross_entropy(hidden.flatten(0, 1), self.lm_head.weight, labels.flatten(),
                                                 ignore_index=-100)
        return LMOutput(logits=self.lm_head(hidden) if return_logits else None, loss=loss)
