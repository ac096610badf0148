"""Decoding shared by every LM here: next-token sampling and ``generate`` over a per-layer inference state.

Every sequence-mixing layer (``backbone.layers[i].mixer``) makes its own inference state with
``new_state(batch, device, dtype)`` (Mamba: the O(1) conv + SSM state; Transformer: a KV cache), and the
model's ``forward(input_ids, states=...)`` continues from those states and updates them. :class:`Generation`
builds on that: ``new_states``, one-token ``step`` and ``generate`` (prefill the prompt in parallel, then
one step per token), so evaluation code drives either architecture the same way.
"""

from __future__ import annotations

import torch


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits (b, V): argmax when temperature is 0, else sample after
    temperature scaling, top-k truncation and top-p (smallest set with mass >= p) truncation."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches p (the top token always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class Generation:
    """Mixin for an ``nn.Module`` LM with ``config.vocab_size``, ``backbone.embeddings``, ``backbone.layers``
    whose ``.mixer`` has ``new_state``, and ``forward(..., states=)``."""

    def new_states(self, batch: int, device=None, dtype=None) -> list:
        """Fresh per-layer inference states (default: the embedding's device and dtype)."""
        p = self.backbone.embeddings.weight
        device, dtype = device or p.device, dtype or p.dtype
        return [layer.mixer.new_state(batch, device, dtype) for layer in self.backbone.layers]

    def step(self, input_ids: torch.Tensor, states: list) -> torch.Tensor:
        """Feed one token per sequence (b,) or (b, 1); updates ``states``; returns logits (b, vocab)."""
        return self.forward(input_ids.reshape(-1, 1), states=states).logits[:, -1]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue ``input_ids`` (b, L). temperature 0 is greedy; otherwise sample from the
        temperature-scaled distribution restricted by top-k and/or top-p (nucleus). The prompt is
        prefilled in parallel, then one cached step per token. Sequences that emit
        ``eos_token_id`` are padded with it. Returns (b, L + new)."""
        states = self.new_states(input_ids.shape[0])
        logits = self.forward(input_ids, states=states).logits[:, -1]
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, : self.config.vocab_size], temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out.append(nxt[:, None])
            if eos_token_id is not None and bool(done.all()):
                break
            logits = self.step(nxt, states)
        return torch.cat(out, dim=1)
