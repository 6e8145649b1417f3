"""Corpora: what `data.corpus` names, as a `Corpus`.

The bundled corpora (`transformer.data.bundled`) and translation pairs are read into memory as
named splits ('train', 'validation' and for the Bible also 'test') of documents (str) or
(source, target) pairs; a language-model corpus of the user's files (text, JSON lines, parquet,
a saved Hugging Face dataset) is streamed as units of work instead (`transformer.data.documents`),
so its size is not bounded by memory. Held-out data is always whole units (plays, books, the last
files) so nothing from a validation document leaks into training, and every split is
deterministic.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from transformer.data import bundled
from transformer.data.documents import (
    EXAMPLE_KINDS,
    FILE_FORMATS,
    MemoryUnit,
    Unit,
    group_units,
    holdout_count,
    input_files,
    plan_splits,
)
from transformer.data.records import expand_files, read_text_file
from transformer.errors import DataError


class Corpus:
    """A named corpus whose text is read only when asked for.

    In-memory corpora (the bundled ones, translation pairs) give their documents or pairs as
    `splits`; a language-model corpus of files is read as a stream of `units` instead, and has no
    `splits`. `fingerprint` is cheap (no reading) and changes whenever the content can, so token
    caches keyed by it never go stale and a run with cached tokens need not read the text at all.
    """

    def __init__(
        self,
        name: str,
        kind: str,
        fingerprint: str,
        loader: Callable[[], dict] | None = None,
        plan: Callable[[], dict[str, list[Unit]]] | None = None,
    ):
        self.name = name
        self.kind = kind  # 'lm': documents (str); 'translation': (source, target) pairs
        self.fingerprint = fingerprint
        self._loader = loader
        self._plan = plan

    @functools.cached_property
    def splits(self) -> dict[str, list]:
        """Split name -> documents or pairs (in-memory corpora)."""
        if self._loader is None:
            raise TypeError(f"corpus {self.name!r} is streamed; read it with units()")
        return self._loader()

    def units(self) -> dict[str, list[Unit | MemoryUnit]]:
        """'train' and 'validation' as units of work for `shards.prepare_shards`."""
        if self._plan is not None:
            return self._plan()
        return {split: [MemoryUnit(split, self.splits[split])] for split in ("train", "validation")}


def _shakespeare_corpus() -> Corpus:
    return Corpus(
        "shakespeare",
        "lm",
        bundled.shakespeare_fingerprint(),
        lambda: {s: list(plays.values()) for s, plays in bundled.load_shakespeare_plays().items()},
    )


def _bible_corpus(name: str, src: str, tgt: str, cache_dir: str | None) -> Corpus:
    fingerprint = bundled.bible_fingerprint(src, tgt)
    loader = functools.partial(bundled.load_bible_pairs, src, tgt, cache_dir)
    return Corpus(name, "translation", fingerprint, loader)


# ---------------------------------------------------------------------------- user files
def _split_units(per_file: list[list], name: str) -> dict[str, list]:
    """Last ~10% of files to validation; with one file, its last ~10% of units."""
    if len(per_file) > 1:
        k = holdout_count(len(per_file))
        return {
            "train": [u for units in per_file[:-k] for u in units],
            "validation": [u for units in per_file[-k:] for u in units],
        }
    units = per_file[0]
    if len(units) < 2:
        raise DataError(
            f"corpus {name!r} has {len(units)} line(s) or record(s) in one file, too few to hold "
            "out validation data; add more lines, records or files."
        )
    k = holdout_count(len(units))
    return {"train": units[:-k], "validation": units[-k:]}


def _read_pairs(pattern: str) -> list[list[tuple[str, str]]]:
    """`source<TAB>target` lines of each file matching `pattern`."""
    per_file = []
    for path in expand_files(pattern):
        pairs = []
        for lineno, line in enumerate(read_text_file(path).splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise DataError(
                    f"{path}:{lineno} has {len(fields)} tab-separated fields, expected "
                    "`source<TAB>target`; fix or remove the line."
                )
            pairs.append((fields[0].strip(), fields[1].strip()))
        per_file.append(pairs)
    if not any(per_file):
        raise DataError(f"corpus 'tsv:{pattern}' is empty; point data.corpus at non-empty files.")
    return per_file


def load_tsv_pairs(pattern: str, eval_pattern: str = "") -> dict[str, list[tuple[str, str]]]:
    """`source<TAB>target` lines as pairs. Validation is every pair of `eval_pattern` when given,
    else the last ~10% of files, or of lines when there is one file."""
    per_file = _read_pairs(pattern)
    if eval_pattern:
        held_out = [pair for pairs in _read_pairs(eval_pattern) for pair in pairs]
        return {"train": [pair for pairs in per_file for pair in pairs], "validation": held_out}
    return _split_units(per_file, f"tsv:{pattern}")


def _files_fingerprint(spec: str, paths: list[Path]) -> str:
    """Spec + each file's path, size and mtime: changes when the user's data does."""
    h = hashlib.sha256(spec.encode())
    for p in paths:
        st = p.stat()
        h.update(f"\0{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _file_corpus(spec: str, text_field: str, eval_spec: str, unit_bytes: int) -> Corpus:
    """A corpus of the user's files, streamed unit by unit (`documents`): documents for a
    language model, or records of conversations (chat, instruct)."""
    key = f"{spec}\0{text_field}\0{eval_spec}\0{unit_bytes}"
    paths = input_files(spec) + (input_files(eval_spec) if eval_spec else [])
    records = spec.partition(":")[0]
    kind = records if records in EXAMPLE_KINDS else "text"

    def plan() -> dict[str, list[Unit]]:
        splits = plan_splits(spec, text_field, eval_spec)
        return {
            s: group_units(s, sources, text_field, unit_bytes, kind)
            for s, sources in splits.items()
        }

    corpus_kind = "lm" if kind == "text" else "chat"
    return Corpus(spec, corpus_kind, _files_fingerprint(key, paths), plan=plan)


# ---------------------------------------------------------------------------- dispatch
CORPORA_HELP = (
    "'shakespeare', 'bible_en_de' (any two of {langs}), 'text:GLOB', 'jsonl:GLOB' (also .gz, "
    ".zst), 'parquet:GLOB', 'hf:DIR' (save_to_disk), 'chat:GLOB' or 'instruct:GLOB' (answers "
    "to learn: JSON lines, parquet or a save_to_disk DIR) or 'tsv:GLOB' (translation pairs)"
)


_BIBLE = re.compile(r"bible_([a-z]{2})_([a-z]{2})")


def corpus_kind(spec: str) -> str:
    """What a `data.corpus` spec trains, read from the spec alone (no file is opened): 'lm'
    (documents, for a GPT), 'chat' (conversations or prompt/completion pairs whose answers a
    GPT learns) or 'translation' (pairs, for an encoder-decoder). DataError for a spec that
    names no corpus."""
    kind, _, pattern = spec.partition(":")
    if spec == "shakespeare" or (kind in FILE_FORMATS and pattern):
        return "lm"
    if kind in EXAMPLE_KINDS and pattern:
        return "chat"
    if _BIBLE.fullmatch(spec) or (kind == "tsv" and pattern):
        return "translation"
    langs = ", ".join(sorted(bundled.BIBLE_TRANSLATIONS))
    raise DataError(f"unknown corpus {spec!r}; use {CORPORA_HELP.format(langs=langs)}.")


def load_corpus(
    spec: str,
    *,
    text_field: str = "text",
    cache_dir: str | None = None,
    eval_corpus: str = "",
    shard_mb: float = 64.0,
) -> Corpus:
    """The corpus named by `data.corpus` (see `CORPORA_HELP`), with `data.eval_corpus` as its
    held-out split when given (file corpora only). `shard_mb` sizes the units file corpora are
    prepared in."""
    corpus_kind(spec)  # an unknown spec fails here, with the list of known ones
    kind, _, pattern = spec.partition(":")
    builtin = spec == "shakespeare" or _BIBLE.fullmatch(spec)
    if eval_corpus and (builtin or eval_corpus.partition(":")[0] != kind):
        raise DataError(
            f"data.eval_corpus={eval_corpus!r} needs data.corpus and data.eval_corpus to be "
            f"files of one kind (e.g. both 'tsv:...' or both 'jsonl:...'); data.corpus is {spec!r}."
        )
    if spec == "shakespeare":
        return _shakespeare_corpus()
    if bible := _BIBLE.fullmatch(spec):
        return _bible_corpus(spec, bible.group(1), bible.group(2), cache_dir)
    if kind in (*FILE_FORMATS, *EXAMPLE_KINDS):
        return _file_corpus(spec, text_field, eval_corpus, int(shard_mb * 2**20))
    eval_pattern = eval_corpus.partition(":")[2]  # tsv: translation pairs
    paths = expand_files(pattern) + (expand_files(eval_pattern) if eval_pattern else [])
    fingerprint = _files_fingerprint(f"{spec}\0{eval_corpus}", paths)
    return Corpus(spec, "translation", fingerprint, lambda: load_tsv_pairs(pattern, eval_pattern))
