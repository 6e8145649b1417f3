"""Prepared token shards: a language-model corpus tokenised unit by unit into memory-mapped files.

One directory per corpus, tokenizer and unit size (`prepared_dir`):

    plan.json              the units and what each reads; identical whichever run writes it
    tokenizer.json         the tokenizer the ids belong to
    train-00000.bin        unit 0's ids, raw uint16 (uint32 above 65536 ids), little-endian;
                           each document followed by EOS
    train-00000.docs.bin   uint64 end offsets of its documents
    train-00000.json       ids, documents, sha256 of the .bin: written last, so a unit with
                           this file is complete
    validation-00000.*     the held-out split, the same way

Any number of runs may prepare one directory at once, each its slice of the units (`shard`,
`num_shards`: units `shard, shard + num_shards, ...` of the plan's order), on one machine or
many sharing the directory. They write nothing in common but the identical `plan.json` and
`tokenizer.json`; every file goes to a temporary name and is renamed when whole, so a killed
run leaves no partial unit, and the next run redoes exactly the units without a `.json`.

A split reads as one `TokenShards`: the units' ids concatenated in plan order, indexed like a
flat numpy array but never loaded whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transformer.data.documents import MemoryUnit, Piece, Unit
from transformer.data.tokenizer import TOKENIZER, Tokenizer
from transformer.errors import DataError
from transformer.files import atomic_output, write_text_atomic

FORMAT = 1  # bump when the layout or the pieces' cut points change: caches are rebuilt
BATCH_CHARS = 4 << 20  # text per encode_batch call: bounds the memory of its Encodings
PLAN, SPLITS = "plan.json", ("train", "validation")


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """Smallest unsigned dtype holding every id: uint16 up to 65536 ids, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def prepared_dir(cache_dir: Path, name: str, fingerprint: str, tokenizer: Tokenizer) -> Path:
    """`cache_dir/tokens/<corpus>-<hash of the corpus fingerprint, tokenizer and format>`."""
    key = _sha256(f"{fingerprint}\0{tokenizer.to_json()}\0{FORMAT}")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")[:48]
    return cache_dir / "tokens" / f"{slug}-{key[:20]}"


AnyUnit = Unit | MemoryUnit


def _unit_names(units: dict[str, Sequence[AnyUnit]]) -> list[tuple[str, AnyUnit]]:
    """(name, unit) in plan order: every train unit, then every validation unit."""
    return [(f"{split}-{i:05d}", u) for split in SPLITS for i, u in enumerate(units[split])]


@dataclasses.dataclass
class PrepareReport:
    """What one `prepare` call did."""

    directory: Path
    units_done: int  # prepared by this call
    units_skipped: int  # already complete (an earlier or concurrent run)
    units_total: int  # in the plan, all shards together
    units_missing: list[str]  # still without a .json (other shards' work) after this call
    tokens: int  # written by this call
    chars: int  # of text read by this call (documents; 0 for records)
    seconds: float
    skipped_records: int = 0  # bad records skipped by this call (data.skip_bad_records)

    def summary(self) -> str:
        rate = self.chars / max(self.seconds, 1e-9) / 1e6
        done = f"{self.units_done} unit(s) prepared, {self.units_skipped} already there"
        left = (
            f"; {len(self.units_missing)} of {self.units_total} still to prepare by other shards"
            if self.units_missing
            else f"; all {self.units_total} units complete"
        )
        skipped = f", {self.skipped_records} bad records skipped" if self.skipped_records else ""
        read = f" from {self.chars / 1e6:.1f} M characters" if self.chars else ""
        speed = f" ({rate:.2f} M chars/s)" if self.chars else ""
        return (
            f"{self.directory}: {done}{left}. {self.tokens:,} tokens{read}{skipped} in "
            f"{self.seconds:.1f} s{speed}."
        )


def prepare_shards(
    units: dict[str, Sequence[AnyUnit]],
    tokenizer: Tokenizer,
    directory: Path,
    *,
    shard: int = 0,
    num_shards: int = 1,
    log: Callable[[str], None] | None = None,
    encode_example: EncodeExample | None = None,
    plan_extra: dict[str, Any] | None = None,
) -> PrepareReport:
    """Tokenises this shard's units that are not complete yet into `directory`.

    `units` maps 'train' and 'validation' to the corpus's units; every run that prepares the
    directory must pass the same units and tokenizer (the plan and tokenizer already there are
    checked against them). Units of records (chat, instruct) are turned into ids and a loss
    mask by `encode_example(where, record, kind)`, which returns None for a record to skip;
    `plan_extra` records in the plan what else the shards depend on (the chat format).
    """
    if not 0 <= shard < num_shards:
        raise DataError(f"--shard={shard} must be in [0, --num_shards={num_shards}).")
    start = time.perf_counter()
    named = _unit_names(units)
    _write_or_check(directory / PLAN, _plan_text(named, tokenizer, plan_extra))
    _write_or_check(directory / TOKENIZER, tokenizer.to_json())
    done = skipped = tokens = chars = skipped_records = 0
    for i, (name, unit) in enumerate(named):
        if i % num_shards != shard:
            continue
        if _complete(directory, name):
            skipped += 1
            continue
        if log:
            log(f"preparing {name} ({i + 1} of {len(named)})")
        if getattr(unit, "kind", "text") == "text":
            written = _prepare_unit(unit, tokenizer, directory, name)
        else:
            written = _prepare_examples(unit, tokenizer, directory, name, encode_example)
        done, tokens, chars = done + 1, tokens + written["tokens"], chars + written["chars"]
        skipped_records += written.get("skipped", 0)
    missing = [name for name, _ in named if not _complete(directory, name)]
    seconds = time.perf_counter() - start
    return PrepareReport(
        directory, done, skipped, len(named), missing, tokens, chars, seconds, skipped_records
    )


def _plan_text(
    named: list[tuple[str, AnyUnit]], tokenizer: Tokenizer, extra: dict[str, Any] | None
) -> str:
    plan = {
        "format": FORMAT,
        "tokenizer_sha256": _sha256(tokenizer.to_json()),
        "dtype": np.dtype(token_dtype(tokenizer.vocab_size)).name,
        "eos_id": tokenizer.eos_id,
        "units": {name: unit.describe() for name, unit in named},
        **(extra or {}),
    }
    return json.dumps(plan, indent=1) + "\n"


def _write_or_check(path: Path, text: str) -> None:
    """Writes `text` to `path`, or checks that the file already there says the same."""
    if path.is_file():
        if path.read_text(encoding="utf-8") != text:
            raise DataError(
                f"{path} was written for other data or another tokenizer than this run's; "
                f"prepare into an empty directory, or delete {path.parent} and prepare again."
            )
        return
    write_text_atomic(path, text)


def _complete(directory: Path, name: str) -> bool:
    return (directory / f"{name}.json").is_file()


def _prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """`items` produced by a background thread, at most `depth` ahead (reading and decompressing
    overlap with encoding, which releases the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def produce() -> None:
        try:
            for item in items:
                q.put(item)
            q.put(end)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)

    threading.Thread(target=produce, daemon=True).start()
    while (item := q.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


def _batches(pieces: Iterable[Piece]) -> Iterator[list[Piece]]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoder(tokenizer: Tokenizer) -> Callable[[list[str]], list]:
    """`encode_batch` without character offsets where the installed `tokenizers` has it."""
    fast = getattr(tokenizer.hf, "encode_batch_fast", None) or tokenizer.hf.encode_batch
    return lambda texts: fast(texts, add_special_tokens=False)


def _prepare_unit(unit: AnyUnit, tokenizer: Tokenizer, directory: Path, name: str) -> dict:
    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype)
    encode, sha = _encoder(tokenizer), hashlib.sha256()
    doc_ends: list[int] = []
    tokens = chars = 0
    with atomic_output(directory / f"{name}.bin") as tmp, open(tmp, "wb") as f:
        for batch in _prefetched(_batches(unit.pieces())):
            encodings = encode([text for text, _ in batch])
            for (text, ends), encoding in zip(batch, encodings, strict=True):
                ids = np.array(encoding.ids, dtype)
                arrays = (ids, eos) if ends else (ids,)
                for array in arrays:
                    f.write(array.tobytes())
                    sha.update(array)
                    tokens += len(array)
                if ends:
                    doc_ends.append(tokens)
                chars += len(text)
    with atomic_output(directory / f"{name}.docs.bin") as tmp:
        np.array(doc_ends, "<u8").tofile(tmp)
    record = {"tokens": tokens, "documents": len(doc_ends), "sha256": sha.hexdigest()}
    write_text_atomic(directory / f"{name}.json", json.dumps(record) + "\n")
    return {"tokens": tokens, "chars": chars}


# Records -> (ids, loss mask) or None to skip; see `transformer.data.chat.ExampleEncoder`.
EncodeExample = Callable[[str, Any, str], "tuple[np.ndarray, np.ndarray] | None"]


def _prepare_examples(
    unit: Unit, tokenizer: Tokenizer, directory: Path, name: str, encode: EncodeExample | None
) -> dict:
    """A unit of records as ids (`.bin`), a loss mask of one byte per id (`.mask.bin`) and the
    end of each example (`.docs.bin`); the `.json` record, written last, counts skipped ones."""
    if encode is None:
        raise ValueError(f"unit {name} holds {unit.kind} records: pass encode_example")
    dtype = token_dtype(tokenizer.vocab_size)
    ids_sha, mask_sha = hashlib.sha256(), hashlib.sha256()
    ends: list[int] = []
    tokens = skipped = 0
    with (
        atomic_output(directory / f"{name}.bin") as ids_tmp,
        atomic_output(directory / f"{name}.mask.bin") as mask_tmp,
        open(ids_tmp, "wb") as ids_file,
        open(mask_tmp, "wb") as mask_file,
    ):
        for where, record in _prefetched(unit.examples()):
            encoded = encode(where, record, unit.kind)
            if encoded is None:
                skipped += 1
                continue
            ids, mask = encoded[0].astype(dtype), encoded[1].astype(np.uint8)
            ids_file.write(ids.tobytes())
            mask_file.write(mask.tobytes())
            ids_sha.update(ids)
            mask_sha.update(mask)
            tokens += len(ids)
            ends.append(tokens)
    with atomic_output(directory / f"{name}.docs.bin") as tmp:
        np.array(ends, "<u8").tofile(tmp)
    record = {
        "tokens": tokens,
        "documents": len(ends),
        "sha256": ids_sha.hexdigest(),
        "mask_sha256": mask_sha.hexdigest(),
        "skipped": skipped,
    }
    write_text_atomic(directory / f"{name}.json", json.dumps(record) + "\n")
    return {"tokens": tokens, "chars": 0, "skipped": skipped}


# ---------------------------------------------------------------------------- reading
class TokenShards:
    """A split's ids: its units' `.bin` files memory-mapped and concatenated in plan order.

    `len()` and integer-array indexing (`shards[starts[:, None] + np.arange(n)]`) behave as on
    the flat array; only the rows asked for are read.
    """

    def __init__(self, arrays: list[np.ndarray], doc_counts: list[int]):
        self.arrays = [a for a in arrays if len(a)]
        self.bounds = np.cumsum([0] + [len(a) for a in self.arrays])
        self.num_documents = sum(doc_counts)
        self.dtype = arrays[0].dtype if arrays else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        if len(self.arrays) == 1:
            return self.arrays[0][index]
        flat = index.ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index out of range [0, {len(self)})")
        which = np.searchsorted(self.bounds, flat, side="right") - 1
        out = np.empty(flat.shape, self.dtype)
        for s in np.unique(which):
            rows = which == s
            out[rows] = self.arrays[s][flat[rows] - self.bounds[s]]
        return out.reshape(index.shape)

    def to_array(self) -> np.ndarray:
        """The whole split in memory (for tests and small corpora)."""
        return np.concatenate(self.arrays) if self.arrays else np.zeros(0, self.dtype)

    @classmethod
    def open(
        cls,
        directory: str | Path,
        split: str,
        *,
        tokenizer: Tokenizer | None = None,
        verify: bool = True,
    ) -> TokenShards:
        """The split of a prepared directory. DataError when a unit is missing or damaged, or
        when `tokenizer` is not the one the directory was prepared with; `verify` also checks
        every unit's sha256 (reads each file once)."""
        plan = _read_plan(Path(directory), tokenizer)
        dtype = np.dtype(plan["dtype"])
        arrays, counts = [], []
        for name in (n for n in plan["units"] if n.startswith(f"{split}-")):
            array, record = _open_unit(Path(directory), name, dtype, verify)
            arrays.append(array)
            counts.append(record["documents"])
        return cls(arrays, counts)


def _read_plan(directory: Path, tokenizer: Tokenizer | None) -> dict[str, Any]:
    """The plan of a prepared directory, checked against this version and `tokenizer`."""
    plan_path = directory / PLAN
    if not plan_path.is_file():
        raise DataError(
            f"{directory} holds no prepared tokens ({PLAN} is missing); run "
            "`python -m transformer.prepare` with the run's config first."
        )
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    if plan.get("format") != FORMAT:
        raise DataError(
            f"{directory} was prepared in format {plan.get('format')}, this version reads "
            f"{FORMAT}; prepare the corpus again."
        )
    if tokenizer is not None and _sha256(tokenizer.to_json()) != plan["tokenizer_sha256"]:
        raise DataError(
            f"{directory} was tokenised with another tokenizer than this run's; use its "
            f"{TOKENIZER} (a fresh workdir adopts it) or prepare the corpus again."
        )
    return plan


def open_examples(
    directory: str | Path, split: str, *, tokenizer: Tokenizer | None = None, verify: bool = True
) -> tuple[TokenShards, TokenShards, np.ndarray, int]:
    """(ids, loss masks, the end of every example in the split's flat ids, records skipped) of
    a split of records (chat, instruct) prepared by `prepare_shards`."""
    directory = Path(directory)
    plan = _read_plan(directory, tokenizer)
    dtype = np.dtype(plan["dtype"])
    ids, masks, ends, counts, skipped, offset = [], [], [], [], 0, 0
    for name in (n for n in plan["units"] if n.startswith(f"{split}-")):
        array, record = _open_unit(directory, name, dtype, verify)
        mask, _ = _open_unit(directory, name, np.dtype(np.uint8), verify, ".mask.bin", "mask_")
        unit_ends = np.fromfile(directory / f"{name}.docs.bin", "<u8").astype(np.int64)
        ids.append(array)
        masks.append(mask)
        ends.append(offset + unit_ends)
        counts.append(record["documents"])
        skipped += record.get("skipped", 0)
        offset += len(array)
    flat_ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    return TokenShards(ids, counts), TokenShards(masks, counts), flat_ends, skipped


def _open_unit(
    directory: Path,
    name: str,
    dtype: np.dtype,
    verify: bool,
    suffix: str = ".bin",
    checksum: str = "",
) -> tuple[Any, dict[str, Any]]:
    """A unit's file `NAME{suffix}` memory-mapped, and its `.json` record; the size and the
    checksum (`{checksum}sha256` in the record) are checked."""
    record_path, path = directory / f"{name}.json", directory / f"{name}{suffix}"
    if not record_path.is_file():
        raise DataError(
            f"{record_path} is missing: unit {name} is not prepared yet; finish every "
            "`--shard` of `python -m transformer.prepare` (rerunning one skips what is done)."
        )
    record = json.loads(record_path.read_text(encoding="utf-8"))
    size = path.stat().st_size if path.is_file() else -1
    if size != record["tokens"] * dtype.itemsize:
        raise DataError(
            f"{path} holds {size} bytes, its index says {record['tokens']} ids of {dtype.name}; "
            f"the shard is damaged: delete {record_path} and rerun the same prepare command."
        )
    if record["tokens"] == 0:
        return np.zeros(0, dtype), record
    array = np.memmap(path, dtype=dtype.newbyteorder("<"), mode="r")
    if verify and hashlib.sha256(array).hexdigest() != record[f"{checksum}sha256"]:
        raise DataError(
            f"{path} does not match its checksum in {record_path.name}; the shard is damaged: "
            f"delete {record_path} and rerun the same prepare command."
        )
    return array, record
