"""Records of the user's files: opening them (compressed or not), and reading JSON lines,
parquet and Arrow files (a dataset `save_to_disk` wrote) record by record, each with where it
is (`path:line` or `path row N`) for the messages. A record is a string field's text (language
model corpora) or the whole record (conversations, prompt/completion pairs).
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from transformer.errors import DataError

PIECE_BYTES = 1 << 20  # text is read and handed on in pieces of about this size
Record = tuple[str, Any]  # (where it is, its value)


def expand_files(pattern: str) -> list[Path]:
    """Files matching a path or glob (`**` recursive), sorted; DataError if there are none."""
    pattern = os.path.expanduser(pattern)
    paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise DataError(f"no file matches {pattern!r}; check the path or glob in data.corpus.")
    return paths


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    """The file's bytes, decompressed when its name ends in `.gz` or `.zst`."""
    name = str(path)
    if name.endswith(".gz"):
        return gzip.open(name, "rb")
    if name.endswith(".zst"):
        zstandard = optional_module("zstandard", name)
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(name, "rb")))
    return open(name, "rb")


def optional_module(module: str, path: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise DataError(
            f"reading {path} needs the {module} package; pip install {module} (or the "
            "project's `data` extra: pip install -e '.[data]')."
        ) from None


def not_utf8(path: str | os.PathLike, offset: int) -> DataError:
    return DataError(
        f"{path} is not UTF-8 (undecodable byte at offset {offset}); convert it, e.g. "
        "`iconv -f latin1 -t utf-8`, or leave it out of data.corpus."
    )


def read_text_file(path: str | os.PathLike) -> str:
    """All the UTF-8 text of a small file (a leading BOM dropped); DataError naming the file."""
    with open_binary(path) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e.start) from None


def skip_bytes(f: IO[bytes], count: int) -> None:
    if count and f.seekable():
        f.seek(count)
        return
    while count > 0:  # compressed: read through
        count -= len(f.read(min(count, PIECE_BYTES)))


def _jsonl(path: str, field: str | None) -> Iterator[Record]:
    with open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise DataError(
                    f"{path}:{lineno} is not valid JSON ({reason}); fix the line."
                ) from None
            if field is None:
                yield f"{path}:{lineno}", record
                continue
            value = record.get(field) if isinstance(record, dict) else None
            if not isinstance(value, str):
                raise DataError(
                    f"{path}:{lineno} has no string field {field!r}; set data.text_field "
                    "to the field holding the text."
                )
            yield f"{path}:{lineno}", value


def _columns(batches: Iterator[Any], path: str, field: str | None) -> Iterator[Record]:
    row = 0
    for batch in batches:
        if field is None:
            for record in batch.to_pylist():
                yield f"{path} row {row}", record
                row += 1
            continue
        if field not in batch.schema.names:
            raise DataError(
                f"{path} has no column {field!r} (it has {', '.join(batch.schema.names)}); "
                "set data.text_field to the column holding the text."
            )
        for value in batch.column(field).to_pylist():
            if not isinstance(value, str):
                raise DataError(
                    f"{path} row {row}: {field!r} is {type(value).__name__}, not text; "
                    "drop such rows or set data.text_field to a string column."
                )
            yield f"{path} row {row}", value
            row += 1


def _parquet(path: str, field: str | None) -> Iterator[Record]:
    optional_module("pyarrow", path)
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid family
        raise DataError(f"{path} is not a readable parquet file ({e}); fix or remove it.") from None
    with parquet:
        columns = [field] if field in parquet.schema_arrow.names else None
        yield from _columns(parquet.iter_batches(1024, columns=columns), path, field)


def _arrow(path: str, field: str | None) -> Iterator[Record]:
    pa = optional_module("pyarrow", path)
    try:
        reader = pa.ipc.open_stream(pa.memory_map(path))
    except Exception as e:
        raise DataError(f"{path} is not a readable Arrow stream ({e}); fix or remove it.") from None
    yield from _columns(iter(reader), path, field)


_READERS = {"jsonl": _jsonl, "parquet": _parquet, "arrow": _arrow}


def read_records(path: str, fmt: str, field: str | None) -> Iterator[Record]:
    """(where, value) of each record of a `jsonl`, `parquet` or `arrow` file: its string field
    `field`, or with `field` None the whole record."""
    return _READERS[fmt](path, field)


def count_records(path: str, fmt: str) -> int:
    """Records in a whole file."""
    if fmt == "parquet":
        optional_module("pyarrow", path)
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in read_records(path, fmt, None))
