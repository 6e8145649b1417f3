"""Translation token caches: each split's sources and targets tokenised once and kept on disk as
two memory-mapped `Ragged` arrays (`pair_tokens`). A cache's name hashes the corpus fingerprint
and the tokenizer, so a changed corpus or vocabulary is tokenised afresh. (Language-model corpora
are prepared as token shards instead: `transformer.data.shards`.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np

from transformer.data.corpora import Corpus
from transformer.data.shards import token_dtype
from transformer.data.tokenizer import Tokenizer, text_pieces
from transformer.files import atomic_output

_ENCODE_GROUP_CHARS = 32 << 20  # text encoded per encode_batch call; bounds Python-int memory
_PIECE_CHARS = 1 << 20  # piece size inside a group; pieces are encoded in parallel


def _cache_path(cache_dir: Path, corpus: Corpus, split: str, tokenizer: Tokenizer) -> Path:
    """`tokens/<corpus>-<split>-<hash of corpus fingerprint and tokenizer json>`."""
    key = hashlib.sha256(f"{corpus.fingerprint}\0{tokenizer.to_json()}".encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", corpus.name).strip("_")[:48]
    return cache_dir / "tokens" / f"{slug}-{split}-{key[:20]}"


def _encode_many(tokenizer: Tokenizer, texts: list[str], dtype: type) -> list[np.ndarray]:
    """One id array per text, encoding big texts piecewise and many texts in parallel batches."""
    group: list[str] = []  # pieces awaiting encode_batch
    owners: list[int] = []  # which text each piece belongs to
    parts: dict[int, list[np.ndarray]] = {}

    def flush() -> None:
        for owner, ids in zip(owners, tokenizer.encode_batch(group), strict=True):
            parts.setdefault(owner, []).append(np.asarray(ids, dtype=dtype))
        group.clear()
        owners.clear()

    size = 0
    for i, text in enumerate(texts):
        for piece in text_pieces(text, _PIECE_CHARS):
            group.append(piece)
            owners.append(i)
            size += len(piece)
            if size >= _ENCODE_GROUP_CHARS:
                flush()
                size = 0
    flush()
    return [np.concatenate(parts.get(i, [np.zeros(0, dtype)])) for i in range(len(texts))]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


@dataclasses.dataclass(frozen=True)
class Ragged:
    """Variable-length id sequences: sequence i is `tokens[offsets[i]:offsets[i + 1]]`."""

    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_arrays(cls, arrays: list[np.ndarray], dtype: type) -> Ragged:
        offsets = np.zeros(len(arrays) + 1, np.int64)
        np.cumsum([len(a) for a in arrays], out=offsets[1:])
        tokens = np.concatenate(arrays).astype(dtype) if arrays else np.zeros(0, dtype)
        return cls(tokens, offsets)


def pair_tokens(
    corpus: Corpus, split: str, tokenizer: Tokenizer, cache_dir: Path
) -> tuple[Ragged, Ragged]:
    """(source, target) id sequences of a translation split, cached like `lm_tokens`."""
    stem = _cache_path(cache_dir, corpus, split, tokenizer)
    paths = {name: stem.with_name(f"{stem.name}.{name}.npy") for name in ("src", "tgt", "off")}
    if not paths["off"].is_file():  # written last, so its presence means all are complete
        dtype = token_dtype(tokenizer.vocab_size)
        pairs = corpus.splits[split]
        src = Ragged.from_arrays(_encode_many(tokenizer, [s for s, _ in pairs], dtype), dtype)
        tgt = Ragged.from_arrays(_encode_many(tokenizer, [t for _, t in pairs], dtype), dtype)
        _save_npy(paths["src"], src.tokens)
        _save_npy(paths["tgt"], tgt.tokens)
        _save_npy(paths["off"], np.stack([src.offsets, tgt.offsets]))
    offsets = np.load(paths["off"])
    return (
        Ragged(np.load(paths["src"], mmap_mode="r"), offsets[0]),
        Ragged(np.load(paths["tgt"], mmap_mode="r"), offsets[1]),
    )
