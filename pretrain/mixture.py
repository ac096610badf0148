"""Weighted mixtures of prepared sources: which source, and which of its windows, global sample ``g`` is.

Samples come in blocks of ``BLOCK``. With normalised weights ``w`` and cumulative shares ``F_s = w_0 + ... + w_s``
(``F_last = 1``), the first ``n`` samples hold ``C_s(n) = floor(F_s n) - floor(F_{s-1} n)`` samples of source
``s``: exact shares up to one sample, for every ``n``, in closed form. Block ``b`` holds ``C_s((b+1)B) - C_s(bB)``
samples of each source (never negative because every share is at least ``1/B``, checked), in an order that is a
permutation seeded by ``(seed, b)``. Sample ``g`` is then the ``k``-th sample of its source, ``k = C_s(bB)`` plus
its rank among the block's samples of ``s``, and window ``k`` of that source's own per-epoch permutation
(:meth:`pretrain.data.PackedDataset.permutation`, keyed by the source index). Everything is a pure function of
``g``: the loader's state stays ``consumed_samples``, and resume is exact under any world size. One source is
``g -> (0, g)``, so ``data.path`` samples exactly as before mixtures existed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pretrain.data import DataError, PackedDataset

BLOCK = 4096  # samples per block: shares are exact per block up to one sample; the smallest share is 1/BLOCK
_MIX_KEY = 0x6D6978  # "mix": separates the block orders' random stream from the sources' window permutations


MAX_EPOCHS = 4  # `polar plan` warns past this many passes over a source (repeats beyond ~4 stop helping)


def normalized(weights: list[float]) -> np.ndarray:
    """Each source's share of the samples."""
    return np.asarray(weights, dtype=np.float64) / float(np.sum(weights))


@dataclass(frozen=True)
class SourcePlan:
    """What a token budget does to one source: its share, its training tokens (None: not prepared yet), and
    how many times the budget passes over them."""

    name: str
    share: float
    tokens: int | None

    def epochs(self, budget_tokens: int) -> float | None:
        return None if not self.tokens else budget_tokens * self.share / self.tokens


def plan_sources(sources: list[tuple[str, float, str]]) -> list[SourcePlan]:
    """(name, weight, prepared folder) -> one :class:`SourcePlan` each, from the folders' manifests."""
    from pretrain.data import DataNotFoundError, load_manifest

    plans = []
    for (name, _, path), share in zip(sources, normalized([w for _, w, _ in sources]), strict=True):
        try:
            tokens = load_manifest(path)["splits"]["train"]["tokens"]
        except DataNotFoundError:
            tokens = None
        plans.append(SourcePlan(name, float(share), tokens))
    return plans


@dataclass(frozen=True)
class Source:
    """A prepared split, its weight (any positive number; normalised over the mixture) and its metrics name."""

    name: str
    weight: float
    dataset: PackedDataset


class Mixture:
    """The global sample order over weighted sources (see the module docstring)."""

    def __init__(self, sources: list[Source], seed: int):
        if not sources:
            raise DataError("data.sources is empty: name at least one prepared folder")
        for s in sources:
            if not s.weight > 0:
                raise DataError(f"source '{s.name}' has weight {s.weight}: weights must be > 0")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise DataError(f"source names repeat ({', '.join(names)}): give each source its own name")
        fps = {s.name: s.dataset.tokens.manifest["tokenizer"]["fingerprint"] for s in sources}
        if len(set(fps.values())) > 1:
            listing = ", ".join(f"{name}={fp[:12]}" for name, fp in fps.items())
            raise DataError(f"the sources were tokenized with different tokenizers ({listing}): prepare every source "
                            "with one tokenizer")
        self.shares = normalized([s.weight for s in sources])
        small = [s.name for s, w in zip(sources, self.shares, strict=True) if w * BLOCK < 1]
        if small:
            raise DataError(f"source '{small[0]}' has a share below 1/{BLOCK} of the mixture: raise its weight or "
                            "drop it")
        self.sources, self.seed = sources, seed
        self._cum = np.cumsum(self.shares)
        self._cum[-1] = 1.0  # exact: C sums to n
        self._block: int | None = None
        self._block_source = self._block_rank = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def counts(self, n: int) -> np.ndarray:
        """Samples of each source among global samples ``[0, n)`` (int64, sums to ``n``)."""
        upto = np.floor(self._cum * n).astype(np.int64)
        upto[-1] = n
        return np.diff(upto, prepend=0)

    def _load_block(self, b: int) -> None:
        n = self.counts((b + 1) * BLOCK) - self.counts(b * BLOCK)
        order = np.repeat(np.arange(len(self.sources)), n)
        if len(self.sources) > 1:
            order = np.random.Generator(np.random.PCG64([self.seed, _MIX_KEY, b])).permutation(order)
        rank = np.empty(BLOCK, dtype=np.int64)
        for s in range(len(self.sources)):
            where = np.flatnonzero(order == s)
            rank[where] = np.arange(len(where))
        self._block, self._block_source, self._block_rank = b, order, rank + self.counts(b * BLOCK)[order]

    def locate(self, g: int) -> tuple[int, int]:
        """(source index, window index in that source's stream) of global sample ``g``."""
        b, p = divmod(g, BLOCK)
        if b != self._block:
            self._load_block(b)
        s, k = int(self._block_source[p]), int(self._block_rank[p])
        ds = self.sources[s].dataset
        epoch, i = divmod(k, ds.num_samples)
        key = (s, epoch)
        if key not in self._perms:
            # one cached permutation per source: the epoch changes rarely; the stale one is dropped
            self._perms = {k2: v for k2, v in self._perms.items() if k2[0] != s}
            self._perms[key] = ds.permutation(self.seed, epoch, () if len(self.sources) == 1 else (s,))
        return s, int(self._perms[key][i])

    def window(self, g: int) -> np.ndarray:
        s, w = self.locate(g)
        return self.sources[s].dataset.window(w)

    def seq_idx(self, g: int) -> np.ndarray:
        """The document of each input position of sample ``g`` (:meth:`pretrain.data.PackedDataset.seq_idx`)."""
        s, w = self.locate(g)
        return self.sources[s].dataset.seq_idx(w)
