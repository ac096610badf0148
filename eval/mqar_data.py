"""Multi-query associative recall (MQAR) data, with the semantics of zoology's ``multiquery_ar``.

Zoology (Arora et al. 2023) is the benchmark behind the polarization paper's Table 2. One sequence of
length L over vocabulary V:

* context: ``num_kv_pairs`` pairs ``k v k v ...``; keys are distinct draws from [1, V/2), values distinct
  draws from [V/2, V);
* the remaining L - 2·num_kv_pairs positions are filler -- token 0 (``filler="zeros"``: what the paper's
  runs used; zoology's ``random_non_queries=False``) or uniform tokens from [0, V) (``"random"``) --
  except that every key appears exactly once more as a query, at an even offset 2·g after the context;
  the gaps g are drawn without replacement with probability ∝ g'^(power_a - 1) (g' = g + 1; power_a =
  0.01 favours short gaps; the paper's config sets ``train_power_a: 0.0``, a name zoology's segment
  config ignores, so its runs used 0.01 too);
* labels are already shifted (``labels[t]`` is the token that should follow ``input_ids[t]``, the
  convention of ``MambaLM.forward``): -100 everywhere except at a query, whose label is its key's value.
  Accuracy is measured only where a label is set.

Sampling is a pure function of the seed (numpy Generator). Draws without replacement use the Gumbel-top-k
trick (top-k of log p + Gumbel noise is distributed exactly as sequential sampling without replacement),
which vectorises over examples.
"""

from __future__ import annotations

import numpy as np
import torch

IGNORE = -100


def _sample_without_replacement(rng: np.random.Generator, n: int, size: int, k: int,
                                logp: np.ndarray | None = None) -> np.ndarray:
    """(n, k) indices into range(size), distinct per row, drawn ∝ exp(logp) (uniform when None). Rows are
    drawn in blocks so memory stays ~128 MB at the paper's sizes (100k rows x 4095 keys)."""
    out = np.empty((n, k), dtype=np.int64)
    block = max(1, 2**24 // size)
    for start in range(0, n, block):
        scores = rng.gumbel(size=(min(block, n - start), size))
        if logp is not None:
            scores += logp
        out[start:start + len(scores)] = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return out


def multiquery_ar(vocab_size: int, seq_len: int, num_kv_pairs: int, num_examples: int, seed: int,
                  power_a: float = 0.01, filler: str = "random") -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (num_examples, seq_len) int64. See the module docstring. The filler is drawn
    last, so both fillers give the same keys, values and query positions for a seed."""
    context = 2 * num_kv_pairs
    half = vocab_size // 2
    if 4 * num_kv_pairs > seq_len:
        raise ValueError(f"MQAR needs seq_len >= 4 x num_kv_pairs, got seq_len={seq_len}, pairs={num_kv_pairs}")
    if filler not in ("zeros", "random"):
        raise ValueError(f"MQAR filler must be 'zeros' or 'random', got {filler!r}")
    if num_kv_pairs > half - 1:
        raise ValueError(f"MQAR needs num_kv_pairs <= vocab_size/2 - 1 distinct keys, got {num_kv_pairs} "
                         f"with vocab_size={vocab_size}")
    rng = np.random.default_rng(seed)
    n = num_examples
    keys = 1 + _sample_without_replacement(rng, n, half - 1, num_kv_pairs)
    values = half + _sample_without_replacement(rng, n, vocab_size - half, num_kv_pairs)
    # Query gaps: zoology's p_g = a·g^(a-1) over g = 1..space, normalised (a = power_a).
    space = (seq_len - context) // 2
    logp = (power_a - 1) * np.log(np.arange(1, space + 1))
    gaps = _sample_without_replacement(rng, n, space, num_kv_pairs, logp)

    inputs = rng.integers(0, vocab_size, size=(n, seq_len)) if filler == "random" else np.zeros((n, seq_len), np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    query_pos = context + 2 * gaps
    rows = np.arange(n)[:, None]
    inputs[rows, query_pos] = keys
    labels = np.full((n, seq_len), IGNORE, dtype=np.int64)
    labels[rows, query_pos] = values
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels)
