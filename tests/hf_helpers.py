"""Comparing our decoding with stock transformers' under one stopping rule."""

from __future__ import annotations

import torch


def assert_same_greedy(ours, theirs, prompt: torch.Tensor, n: int) -> None:
    """Greedy continuations of ``prompt`` (1, L) agree. Stock ``generate`` stops at its generation config's EOS, so
    ours is given the same id: without it, a draw whose greedy path meets EOS compares a stopped sequence with a
    continued one (the seed-dependent failure `make test-seeds` found, docs/testing.md)."""
    eos = theirs.generation_config.eos_token_id
    assert eos is None or isinstance(eos, int), eos
    expected = theirs.generate(prompt, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours.generate(prompt, n, eos_token_id=eos), expected)
