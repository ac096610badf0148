"""Prepared token data: the shard/manifest format, validated memmap views, packed samples and the resumable loader.

``polar prepare`` writes a directory of ``{split}_{k:05d}.bin`` token shards (raw little-endian uint16/uint32),
beside each the ends of its documents (``.idx``), plus ``manifest.json``. Training reads a split as one
concatenated token stream (documents joined by EOS), cut into non-overlapping windows of ``seq_len + 1`` tokens.
Global sample ``g`` is window ``perm[epoch][g % num_samples]`` with ``epoch = g // num_samples`` and
``perm[epoch]`` a permutation seeded by ``(seed, epoch)``; it belongs to data-parallel rank ``g % world_size``
(several weighted sources: pretrain/mixture.py). The loader's whole state is ``consumed_samples``, so a resumed
run (even with another world size) sees exactly the samples the uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pretrain.mixture import Mixture

MANIFEST = "manifest.json"
FORMAT = "polar-tokens"
FORMAT_VERSION = 2  # 2: a document index beside each shard; version 1 folders (no index) still train
READABLE_VERSIONS = (1, 2)
INDEX_DTYPE = np.dtype("<u8")  # document ends, as datatrove's .ds.index
SPLITS = ("train", "val")


class DataError(ValueError):
    """Prepared data is unusable (corrupt, mismatched, too short); the message names the fix."""


class DataNotFoundError(FileNotFoundError):
    """Prepared data (manifest or shard) is missing."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id (little-endian, fixed across machines)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_name(split: str, index: int) -> str:
    return f"{split}_{index:05d}.bin"


def index_name(shard: str) -> str:
    """The document index beside a shard: the exclusive ends (token offsets in the shard, little-endian uint64)
    of the documents whose EOS lies in it."""
    return shard.removesuffix(".bin") + ".idx"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(data_dir: str | Path) -> dict[str, Any]:
    """Read and check ``DIR/manifest.json``."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataNotFoundError(f"no {MANIFEST} in {data_dir}: run polar prepare --out {data_dir} first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is corrupt ({e.msg}): re-run polar prepare") from e
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE_VERSIONS:
        raise DataError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest: re-run polar prepare with this version")
    return manifest


class TokenShards:
    """All shards of one split, memory-mapped and validated, addressed as one token stream."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        expected_fingerprint: str | None = None,
        verify_checksums: bool = False,
    ):
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = load_manifest(data_dir)
        fp = self.manifest["tokenizer"]["fingerprint"]
        if expected_fingerprint is not None and expected_fingerprint != fp:
            raise DataError(
                f"data in {data_dir} was tokenized with tokenizer {fp[:12]}, but --tokenizer has "
                f"{expected_fingerprint[:12]}: re-run polar prepare with this tokenizer or pass the matching one"
            )
        if split not in self.manifest["splits"]:
            raise DataError(f"{data_dir} has no split '{split}': it has {', '.join(self.manifest['splits'])}")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eos_id: int = self.manifest["eos_id"]
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]
        self.shards: list[np.ndarray] = []
        for entry in self.manifest["splits"][split]["shards"]:
            self.shards.append(self._open(entry, verify_checksums))
        self.max_ids: list[int | None] = [e.get("max_id") for e in self.manifest["splits"][split]["shards"]]
        sizes = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])  # start of each shard in the stream
        self.num_tokens = int(self.offsets[-1])
        self._ends: np.ndarray | None = None

    def _open(self, entry: dict[str, Any], verify: bool) -> np.ndarray:
        path = self.data_dir / entry["file"]
        if not path.is_file():
            raise DataNotFoundError(f"shard {path} is missing: re-run polar prepare --out {self.data_dir} --force")
        expected = entry["tokens"] * self.dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise DataError(
                f"shard {path} is truncated or corrupt: {size} bytes, the manifest says {expected} "
                f"({entry['tokens']} tokens of {self.dtype.name}): re-run polar prepare --out {self.data_dir} --force"
            )
        if verify and sha256_file(path) != entry["sha256"]:
            raise DataError(
                f"shard {path} is corrupt: its sha256 differs from the manifest: "
                f"re-run polar prepare --out {self.data_dir} --force"
            )
        if "index" in entry:
            index = self.data_dir / entry["index"]
            size = index.stat().st_size if index.is_file() else -1
            if size != entry["document_ends"] * INDEX_DTYPE.itemsize:
                raise DataError(f"document index {index} is missing, truncated or corrupt: re-run polar prepare "
                                f"--out {self.data_dir} --force")
        if entry["tokens"] == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")

    def document_ends(self) -> np.ndarray:
        """Exclusive ends of every document (the position after its EOS) in the split's stream, ascending (int64).
        Documents start at 0 and at each end; training can reset state there, evaluation take whole documents."""
        if self._ends is None:
            entries = self.manifest["splits"][self.split]["shards"]
            if any("index" not in e for e in entries):
                raise DataError(f"{self.data_dir} was prepared without document indexes (format v1): re-run polar "
                                f"prepare --out {self.data_dir} --force")
            parts = [np.fromfile(self.data_dir / e["index"], dtype=INDEX_DTYPE).astype(np.int64) + int(self.offsets[k])
                     for k, e in enumerate(entries)]
            self._ends = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return self._ends

    def __len__(self) -> int:
        return self.num_tokens

    def shard_path(self, index: int) -> Path:
        return self.data_dir / self.manifest["splits"][self.split]["shards"][index]["file"]

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse data holding ids a ``vocab_size`` embedding cannot look up (from the manifest's max ids)."""
        for k, max_id in enumerate(self.max_ids):
            if max_id is not None and max_id >= vocab_size:
                raise DataError(
                    f"shard {self.shard_path(k)} holds token id {max_id}, outside the model's vocabulary of "
                    f"{vocab_size}: set model.vocab_size to the tokenizer's ({self.vocab_size}) or re-run polar prepare"
                )

    def locate(self, position: int) -> tuple[Path, int]:
        """(shard file, token offset in it) of stream position ``position``."""
        k = int(np.searchsorted(self.offsets, position, side="right")) - 1
        return self.shard_path(k), position - int(self.offsets[k])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream (a view when inside one shard)."""
        k = int(np.searchsorted(self.offsets, start, side="right")) - 1
        local = start - int(self.offsets[k])
        shard = self.shards[k]
        if local + length <= len(shard):
            return shard[local : local + length]
        parts, need = [], length
        while need > 0:
            piece = self.shards[k][local : local + need]
            parts.append(piece)
            need -= len(piece)
            k, local = k + 1, 0
        return np.concatenate(parts)


@dataclass(frozen=True)
class PackedDataset:
    """Non-overlapping windows of ``seq_len + 1`` tokens over a split, in a seeded order per epoch.

    With ``vocab_size`` every window read is checked (a max over the window: cheap) so a shard damaged
    after prepare, with its size unchanged, fails naming the shard and offset instead of an IndexError."""

    tokens: TokenShards
    seq_len: int
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.num_samples < 1:
            raise DataError(
                f"seq_len {self.seq_len} is longer than the data: split '{self.tokens.split}' of "
                f"{self.tokens.data_dir} has {self.tokens.num_tokens} tokens (needs >= {self.seq_len + 1}): "
                "use a shorter seq_len or prepare more data"
            )

    @property
    def num_samples(self) -> int:
        return (self.tokens.num_tokens - 1) // self.seq_len

    def window(self, index: int) -> np.ndarray:
        """Window ``index`` in stream order: tokens ``[index*seq_len, (index+1)*seq_len]`` (inclusive)."""
        start = index * self.seq_len
        w = self.tokens.read(start, self.seq_len + 1)
        if self.vocab_size is not None and len(w) and int(w.max()) >= self.vocab_size:
            bad = int(np.argmax(w >= self.vocab_size))
            shard, offset = self.tokens.locate(start + bad)
            raise DataError(
                f"shard {shard} is corrupt: token id {int(w[bad])} at token offset {offset} is outside the "
                f"vocabulary of {self.vocab_size}: re-run polar prepare --out {self.tokens.data_dir} --force"
            )
        return w

    def document_starts(self, index: int) -> np.ndarray:
        """Offsets ``p`` in ``(0, seq_len]`` of window ``index`` where a new document begins (the token at ``p``
        follows an EOS): where a model that resets at boundaries resets."""
        start = index * self.seq_len
        ends = self.tokens.document_ends()
        lo = np.searchsorted(ends, start + 1, side="left")
        hi = np.searchsorted(ends, start + self.seq_len, side="right")
        return ends[lo:hi] - start

    def seq_idx(self, index: int) -> np.ndarray:
        """int32 (seq_len,): the document of each input position of window ``index``, counted from the window's
        first (kernels/documents.py: where a model resets with ``data.document_boundaries: reset``)."""
        return np.searchsorted(self.document_starts(index), np.arange(self.seq_len), side="right").astype(np.int32)

    def permutation(self, seed: int, epoch: int, key: tuple[int, ...] = ()) -> np.ndarray:
        """The visiting order of epoch ``epoch``: a new permutation per epoch, the same on every rank; ``key``
        separates the sources of a mixture (pretrain/mixture.py; empty for a single source)."""
        rng = np.random.Generator(np.random.PCG64([seed, *key, epoch]))
        order = rng.permutation(self.num_samples)
        return order.astype(np.uint32) if self.num_samples < 1 << 32 else order


class DistributedSampleLoader:
    """Micro-batches of one data-parallel rank; its whole state is the global ``consumed_samples``.

    Global micro-step ``s`` covers global samples ``[c, c + micro_batch_size * world_size)`` with
    ``c = consumed_samples``; this rank takes those ``g`` with ``g % world_size == rank``. Sample ``g`` is
    ``mixture.window(g)`` (pretrain/mixture.py; a single dataset is a mixture of one). Each batch is
    ``(input_ids, labels)``, LongTensors of shape ``[micro_batch_size, seq_len]``, labels shifted by one; with
    ``document_boundaries="reset"`` also each window's ``seq_idx`` (int32, same shape) as a third element.
    """

    def __init__(
        self,
        data: PackedDataset | Mixture,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        consumed_samples: int = 0,
        document_boundaries: str = "carry",
    ):
        from pretrain.mixture import Mixture, Source

        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if micro_batch_size < 1:
            raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.mixture = data if isinstance(data, Mixture) else Mixture([Source(data.tokens.split, 1.0, data)], seed)
        if self.mixture.seed != seed:
            raise DataError(f"the mixture has seed {self.mixture.seed}, the loader {seed}: build both with one seed")
        self.micro_batch_size = micro_batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.consumed_samples = consumed_samples
        self.resets = document_boundaries == "reset"

    def state_dict(self) -> dict[str, int]:
        # seed and world size are informative only: resume is defined by consumed_samples alone.
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "seed" in state and state["seed"] != self.seed:
            raise DataError(
                f"loader state was saved with seed {state['seed']}, this loader has seed {self.seed}: "
                "resume with the same seed"
            )
        self.consumed_samples = int(state["consumed_samples"])

    def sample_indices(self, consumed_samples: int) -> list[int]:
        """Global sample indices of this rank's micro-batch starting at ``consumed_samples``."""
        first = consumed_samples + self.rank
        return [first + k * self.world_size for k in range(self.micro_batch_size)]

    def __iter__(self) -> DistributedSampleLoader:
        return self

    def __next__(self):
        import torch

        indices = self.sample_indices(self.consumed_samples)
        batch = np.stack([self.mixture.window(g) for g in indices])
        self.consumed_samples += self.micro_batch_size * self.world_size
        batch = torch.from_numpy(batch.astype(np.int64))
        if self.resets:
            seq_idx = torch.from_numpy(np.stack([self.mixture.seq_idx(g) for g in indices]))
            return batch[:, :-1], batch[:, 1:], seq_idx
        return batch[:, :-1], batch[:, 1:]
