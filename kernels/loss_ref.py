"""Linear + cross-entropy over chunks of tokens, never holding the whole (tokens x vocab) logits.

loss = mean over non-ignored tokens of logsumexp(h W^T) - (h W^T)[label]. The forward pass computes one
chunk of logits at a time and keeps only its log-sum-exp per token; the backward pass recomputes each
chunk's logits and turns them in place into dlogits = (softmax - onehot) · g / n_valid, then
dh = dlogits W and dW += dlogits^T h. Peak extra memory is one chunk of fp32 logits, not T x V.

The per-chunk softmax maths is pluggable (:class:`ChunkCE`), so the Triton version
(:mod:`kernels.loss_triton`) shares this autograd Function and only swaps the row kernels.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class ChunkCE:
    """Row-wise cross-entropy on one chunk of fp32 logits (plain PyTorch)."""

    # False: logits are upcast to fp32 (fp64 stays fp64) before the maths; True: the row kernels read
    # bf16/fp16 logits as they come from the matmul and write dlogits back in that dtype (no fp32 copy)
    reads_low_precision = False

    @staticmethod
    def forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (per-row loss, 0 where ignored; per-row logsumexp)."""
        lse = torch.logsumexp(logits, dim=-1)
        valid = labels != ignore_index
        target = logits.gather(1, labels.clamp(min=0)[:, None])[:, 0]
        return torch.where(valid, lse - target, 0.0), lse

    @staticmethod
    def backward_(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                  scale: torch.Tensor) -> torch.Tensor:
        """Overwrites ``logits`` with d(loss)/d(logits) = (softmax - onehot) · scale (0 on ignored rows)."""
        valid = labels != ignore_index
        probs = logits.sub_(lse[:, None]).exp_()
        probs[valid, labels[valid]] -= 1.0
        return probs.mul_(torch.where(valid, scale, 0.0)[:, None])


class LinearCrossEntropy(torch.autograd.Function):
    """mean CE(hidden @ weight^T, labels), chunked over tokens; logits recomputed in backward.

    The matmuls run in the inputs' dtype (bf16 under autocast, as the LM head would) and the logits are
    upcast to fp32 (fp64 stays fp64) before the softmax, so the loss equals
    ``F.cross_entropy(logits.float(), labels)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, ce):
        T = hidden.shape[0]
        cdt = torch.promote_types(hidden.dtype, torch.float32)  # fp32 (fp64 for fp64 inputs)
        n_valid = (labels != ignore_index).sum()
        lse = torch.empty(T, device=hidden.device, dtype=cdt)
        total = torch.zeros((), device=hidden.device, dtype=cdt)
        for s in range(0, T, chunk_size):
            logits = hidden[s : s + chunk_size] @ weight.T
            rows, lse[s : s + chunk_size] = ce.forward(logits if ce.reads_low_precision else logits.to(cdt),
                                                       labels[s : s + chunk_size], ignore_index)
            total += rows.sum()
        ctx.save_for_backward(hidden, weight, labels, lse, n_valid)
        ctx.ignore_index, ctx.chunk_size, ctx.ce = ignore_index, chunk_size, ce
        return total / n_valid  # nan when every label is ignored, as F.cross_entropy

    @staticmethod
    def backward(ctx, g):
        hidden, weight, labels, lse, n_valid = ctx.saved_tensors
        scale = (g / n_valid).to(lse.dtype)
        gh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(weight.shape, device=weight.device, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[s : s + ctx.chunk_size]
            logits = h @ weight.T
            dlogits = ctx.ce.backward_(logits if ctx.ce.reads_low_precision else logits.to(lse.dtype),
                                       lse[s : s + ctx.chunk_size],
                                       labels[s : s + ctx.chunk_size], ctx.ignore_index, scale)
            dlogits = dlogits.to(hidden.dtype)
            if gh is not None:
                gh[s : s + ctx.chunk_size] = dlogits @ weight
            if gw is not None:
                gw += dlogits.T @ h
        return gh, None if gw is None else gw.to(weight.dtype), None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, chunk_size: int = 1024, ce=ChunkCE) -> torch.Tensor:
    """hidden (T, d), weight (V, d), labels (T,) -> mean cross-entropy over non-ignored tokens (fp32)."""
    return LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_size, ce)
