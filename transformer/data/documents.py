"""Documents streamed from the user's files in bounded memory, planned as units of work.

A language-model corpus of files becomes `Source`s (one file, or a slice of one file) grouped in
order into `Unit`s of about `data.shard_mb` megabytes of input. A unit yields its text as
`(piece, ends_document)` pairs, each piece at most about a megabyte and cut at a line end, so
nothing ever holds a whole file; one unit is the work of one preparation step and becomes one
token shard (`transformer.data.shards`).

Formats, by the `data.corpus` prefix:

- `text:GLOB`: each file is one document.
- `jsonl:GLOB`: one document per non-blank line, from its string field `data.text_field`.
- `parquet:GLOB`: one document per row of the string column `data.text_field` (needs `pyarrow`).
- `hf:DIR`: a Hugging Face dataset written by `save_to_disk` (needs `pyarrow`, not `datasets`);
  a `DatasetDict` gives its `train` split and holds out its `validation` (else `test`) split.
- `chat:GLOB`, `instruct:GLOB`: one example per record (`{"messages": [...]}`, or
  `{"prompt", "completion"}`; `transformer.data.chat`) of JSON lines, parquet files (by their
  suffix) or a `save_to_disk` directory (`chat:DIR` or `chat:hf:DIR`).

Text and JSON lines may be compressed (`.gz`, `.zst`; the latter needs `zstandard`). Held-out
data is the last ~10% of the files, or with a single file its last ~10% of documents (of bytes
for one text file, cut at a line end), or all of `data.eval_corpus` when that is given.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformer.data.records import (
    PIECE_BYTES,
    Record,
    count_records,
    expand_files,
    not_utf8,
    open_binary,
    read_records,
    skip_bytes,
)
from transformer.data.tokenizer import text_pieces
from transformer.errors import DataError

VALIDATION_FRACTION = 0.1  # of files, or of documents (bytes for text) when there is one file
FILE_FORMATS = ("text", "jsonl", "parquet", "hf")
EXAMPLE_KINDS = ("chat", "instruct")  # records to learn answers from, in any of those containers


@dataclasses.dataclass(frozen=True)
class Source:
    """One file, or the slice `[start, stop)` of its documents (bytes for `text`)."""

    path: str
    fmt: str  # text | jsonl | parquet | arrow (a file of a save_to_disk dataset)
    start: int = 0
    stop: int | None = None  # None: to the end of the file

    def to_json(self) -> list:
        return [self.path, self.fmt, self.start, self.stop]


Piece = tuple[str, bool]  # (text, whether it ends a document)


@dataclasses.dataclass(frozen=True)
class Unit:
    """Sources prepared together into one token shard, in order."""

    split: str
    sources: tuple[Source, ...]
    text_field: str = "text"
    kind: str = "text"  # text: documents as text pieces; chat | instruct: records (`examples`)

    def pieces(self) -> Iterator[Piece]:
        for source in self.sources:
            yield from read_pieces(source, self.text_field)

    def examples(self) -> Iterator[Record]:
        """(where, record) of every record of the sources, in order."""
        for source in self.sources:
            records = read_records(source.path, source.fmt, None)
            for i, record in enumerate(records):
                if source.stop is not None and i >= source.stop:
                    break
                if i >= source.start:
                    yield record

    def describe(self) -> dict[str, Any]:
        described = {"split": self.split, "sources": [s.to_json() for s in self.sources]}
        return described if self.kind == "text" else {**described, "kind": self.kind}


@dataclasses.dataclass(frozen=True)
class MemoryUnit:
    """Documents already in memory (the bundled corpora), as one unit."""

    split: str
    documents: list[str]

    def pieces(self) -> Iterator[Piece]:
        for doc in self.documents:
            yield from _document_pieces(doc)

    def describe(self) -> dict[str, Any]:
        return {"split": self.split, "documents": len(self.documents)}


def _document_pieces(text: str) -> Iterator[Piece]:
    pieces = text_pieces(text, PIECE_BYTES) or [""]
    for i, piece in enumerate(pieces):
        yield piece, i == len(pieces) - 1


# ---------------------------------------------------------------------------- readers
def read_pieces(source: Source, text_field: str = "text") -> Iterator[Piece]:
    """The source's documents as pieces of at most about `PIECE_BYTES`, cut at line ends."""
    if source.fmt == "text":
        yield from _text_pieces(source)
        return
    for i, (_, text) in enumerate(read_records(source.path, source.fmt, text_field)):
        if source.stop is not None and i >= source.stop:
            return
        if i >= source.start:
            yield from _document_pieces(text)


def _text_pieces(source: Source) -> Iterator[Piece]:
    """A text file (or its byte slice) as one document. Pieces end at a line end where one
    comes within a few megabytes; an incremental decoder keeps characters whole regardless."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    end = math.inf if source.stop is None else source.stop
    with open_binary(source.path) as f:
        skip_bytes(f, source.start)
        offset, pending = source.start, None
        while offset < end:
            raw = f.read(int(min(PIECE_BYTES, end - offset)))
            if raw and not raw.endswith(b"\n") and offset + len(raw) < end:
                raw += f.readline(int(min(4 * PIECE_BYTES, end - offset - len(raw))))
            if not raw:
                break
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError as e:
                raise not_utf8(source.path, offset + e.start) from None
            if offset == 0:
                text = text.removeprefix("\ufeff")
            offset += len(raw)
            if pending is not None:
                yield pending, False
            pending = text
    try:
        tail = decoder.decode(b"", final=True)
    except UnicodeDecodeError:  # a character cut off at the end of the file
        raise not_utf8(source.path, offset - 1) from None
    yield (pending or "") + tail, True


def count_documents(source: Source) -> int:
    """Documents in a whole file (bytes for `text`): what a single-file split divides."""
    if source.fmt == "text":
        if not source.path.endswith((".gz", ".zst")):
            return os.path.getsize(source.path)
        with open_binary(source.path) as f:
            return sum(len(b) for b in iter(lambda: f.read(PIECE_BYTES), b""))
    return count_records(source.path, source.fmt)


def _text_cut(path: str, size: int) -> int:
    """Where one text file's held-out tail starts: the last line end in the 80-90% stretch of
    its bytes (the 90% mark itself if that stretch has none)."""
    low, high = int(size * (1 - 2 * VALIDATION_FRACTION)), int(size * (1 - VALIDATION_FRACTION))
    cut, offset = high, 0
    with open_binary(path) as f:
        skip_bytes(f, low)
        offset = low
        while offset < high:
            raw = f.read(min(PIECE_BYTES, high - offset))
            if not raw:
                break
            newline = raw.rfind(b"\n")
            if newline >= 0:
                cut = offset + newline + 1
            offset += len(raw)
    return cut if cut < high or size == 0 else high


# ---------------------------------------------------------------------------- planning
def holdout_count(n: int) -> int:
    """How many of `n` files or documents (at least 1, at most n - 1) go to validation."""
    return min(max(1, round(n * VALIDATION_FRACTION)), n - 1)


def _hf_files(pattern: str) -> dict[str, list[Path]]:
    """Arrow files of the `save_to_disk` directory of an `hf:DIR` corpus: {'': files} or
    {split: files}."""
    directory = Path(os.path.expanduser(pattern))
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory; point data.corpus='hf:DIR' at one.")

    def dataset_files(d: Path) -> list[Path]:
        state = d / "state.json"
        if not state.is_file():
            raise DataError(
                f"{d} is not a dataset written by save_to_disk (no state.json); point "
                "data.corpus='hf:DIR' at the directory save_to_disk wrote."
            )
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
        return [d / name for name in names]

    if (directory / "dataset_dict.json").is_file():
        splits = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        return {split: dataset_files(directory / split) for split in splits}
    return {"": dataset_files(directory)}


def _container(spec: str) -> tuple[str, str]:
    """(container, pattern) of a file corpus spec: `chat:` and `instruct:` records come from
    JSON lines, parquet files or a `save_to_disk` directory (`chat:DIR` or `chat:hf:DIR`), told
    apart by the path."""
    kind, _, pattern = spec.partition(":")
    if kind not in EXAMPLE_KINDS:
        return kind, pattern
    if pattern.startswith("hf:"):
        return "hf", pattern.removeprefix("hf:")
    if os.path.isdir(os.path.expanduser(pattern)):
        return "hf", pattern
    return "records", pattern


def _sources(spec: str, text_field: str) -> tuple[list[Source], list[Source] | None]:
    """(sources, held-out sources the corpus names itself, e.g. a DatasetDict's validation)."""
    kind, pattern = _container(spec)
    if kind == "records":
        files = expand_files(pattern)
        return [
            Source(str(p), "parquet" if p.suffix == ".parquet" else "jsonl") for p in files
        ], None
    if kind == "hf":
        files = _hf_files(pattern)
        if "" in files:
            return [Source(str(p), "arrow") for p in files[""]], None
        if "train" not in files:
            raise DataError(f"{pattern} has no 'train' split (it has {', '.join(files)}).")
        held = files.get("validation") or files.get("test")
        held_out = [Source(str(p), "arrow") for p in held] if held else None
        return [Source(str(p), "arrow") for p in files["train"]], held_out
    return [Source(str(p), kind) for p in expand_files(pattern)], None


def input_files(spec: str) -> list[Path]:
    """Every file a file corpus spec reads (for its fingerprint)."""
    kind, pattern = _container(spec)
    if kind == "hf":
        return [p for files in _hf_files(pattern).values() for p in files]
    return expand_files(pattern)


def plan_splits(
    spec: str, text_field: str = "text", eval_spec: str = ""
) -> dict[str, list[Source]]:
    """Split ('train', 'validation') -> sources of a file corpus (see the module docstring)."""
    sources, held_out = _sources(spec, text_field)
    if eval_spec:  # its kind is checked by `corpora.load_corpus`
        evaluation, _ = _sources(eval_spec, text_field)
        return {"train": sources, "validation": evaluation}
    if held_out is not None:
        return {"train": sources, "validation": held_out}
    if len(sources) > 1:
        k = holdout_count(len(sources))
        return {"train": sources[:-k], "validation": sources[-k:]}
    (source,) = sources
    n = count_documents(source)
    if source.fmt == "text":
        if n == 0:
            raise DataError(f"corpus {spec!r} is empty; point data.corpus at non-empty files.")
        cut = _text_cut(source.path, n)
    else:
        if n < 2:
            raise DataError(
                f"corpus {spec!r} has {n} record(s) in one file, too few to hold out validation "
                "data; add more records or files."
            )
        cut = n - holdout_count(n)
    return {
        "train": [dataclasses.replace(source, stop=cut)],
        "validation": [dataclasses.replace(source, start=cut)],
    }


def group_units(
    split: str, sources: list[Source], text_field: str, unit_bytes: int, kind: str = "text"
) -> list[Unit]:
    """Consecutive sources in units of about `unit_bytes` of input (file sizes on disk)."""
    units, group, size = [], [], 0
    for source in sources:
        group.append(source)
        size += _source_bytes(source)
        if size >= unit_bytes:
            units.append(Unit(split, tuple(group), text_field, kind))
            group, size = [], 0
    if group or not units:
        units.append(Unit(split, tuple(group), text_field, kind))
    return units


def _source_bytes(source: Source) -> int:
    if source.fmt == "text" and not source.path.endswith((".gz", ".zst")):
        stop = os.path.getsize(source.path) if source.stop is None else source.stop
        return stop - source.start
    return os.path.getsize(source.path)
