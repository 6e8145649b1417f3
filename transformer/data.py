"""Data pipeline: tokenised corpora cached on disk, batched by `grain`, one entry point `make_data`.

Batches are numpy dicts, already cut to this process's rows of the global batch (rows
`[process_index * local, (process_index + 1) * local)`), ready for
`jax.make_array_from_process_local_data`:

- language model, train: `tokens` int32 `[b, seq_len + 1]`; inputs are `tokens[:, :-1]`, targets
  `tokens[:, 1:]`. Windows start at multiples of `seq_len` (each shares its last token with the
  next window's first) and are drawn without replacement, reshuffled every epoch; batches run on
  across epoch ends, so the first `num_windows` rows of the stream hold every window once.
- language model, eval: the same plus `mask` int32 `[b, seq_len]` (1 = a real target). The last
  global batch is padded with zero rows whose mask is 0, so every window counts exactly once and
  every process yields the same number of batches.
- translation (train and eval): `src`, `tgt_in`, `tgt_out`, `src_segment_ids`, `tgt_segment_ids`,
  `src_positions`, `tgt_positions`, all int32 `[b, seq_len]`. `src` = source + EOS, `tgt_in` =
  BOS + target, `tgt_out` = target + EOS; padding is 0 with segment id 0. Packed rows
  (`data.pack`) hold several pairs with segment ids 1, 2, ... and positions restarting at 0 per
  pair; attention must then compare segment ids, not only test them for 0. Sequences longer than
  `seq_len` are truncated (`data.truncate`, default True) or raise `DataError`.

Iterators are `grain.DatasetIterator`s: `get_state()`/`set_state()` and Orbax
`grain.checkpoint.CheckpointSave`/`CheckpointRestore` resume at the exact next batch. Their state
is a global batch counter, so it does not depend on process count.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from transformer.corpora import Corpus, default_cache_dir, load_corpus
from transformer.run_config import DataConfig
from transformer.rundir import atomic_output
from transformer.tasks import TRANSLATION_KEYS
from transformer.tokenizer import DataError, Tokenizer, text_pieces

log = logging.getLogger(__name__)

# Two threads overlap batch assembly with the train step; more only contend for the GIL.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)
_ENCODE_GROUP_CHARS = 32 << 20  # text encoded per encode_batch call; bounds Python-int memory
_PIECE_CHARS = 1 << 20  # piece size inside a group; pieces are encoded in parallel


# ---------------------------------------------------------------------------- token caches
def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """Smallest unsigned dtype holding every id: uint16 up to 65536 ids, else uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


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


def lm_tokens(corpus: Corpus, split: str, tokenizer: Tokenizer, cache_dir: Path) -> np.ndarray:
    """The split as one flat token array (each document followed by EOS), memory-mapped.

    Cached in `cache_dir/tokens/`; a second call with the same corpus and tokenizer reads the
    cache and neither reads the text nor tokenises.
    """
    path = _cache_path(cache_dir, corpus, split, tokenizer).with_suffix(".npy")
    if not path.is_file():
        dtype = token_dtype(tokenizer.vocab_size)
        eos = np.array([tokenizer.eos_id], dtype)
        docs = _encode_many(tokenizer, corpus.splits[split], dtype)
        _save_npy(path, np.concatenate([a for doc in docs for a in (doc, eos)]))
    return np.load(path, mmap_mode="r")


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


# ---------------------------------------------------------------------------- shared helpers
def local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Rows per process; DataError unless the global batch divides evenly among processes."""
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, {process_count}).")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataError(
            f"global batch size {global_batch_size} does not divide among {process_count} "
            "processes; set train.batch_size to a positive multiple of the process count."
        )
    return global_batch_size // process_count


def _global_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """This process's rows of a global batch."""
    local = local_batch_size(global_batch_size, process_index, process_count)
    return slice(process_index * local, (process_index + 1) * local)


def _shuffled_batches(num_items: int, seed: int, global_batch_size: int) -> grain.MapDataset:
    """Infinite stream of global batches of item indices; each epoch a fresh permutation."""
    # shuffle before repeat: grain folds the epoch into the seed, so epochs differ.
    ds = grain.MapDataset.range(num_items).shuffle(seed=seed % 2**32).repeat()
    return ds.batch(global_batch_size)


def iterator(dataset: grain.MapDataset) -> grain.DatasetIterator:
    """A checkpointable iterator with background prefetch."""
    return iter(dataset.to_iter_dataset(READ_OPTIONS))


# ---------------------------------------------------------------------------- language model
def num_windows(tokens: np.ndarray, seq_len: int) -> int:
    """Windows of `seq_len + 1` tokens starting at multiples of `seq_len`."""
    return max(0, (len(tokens) - 1) // seq_len)


def _check_windows(tokens: np.ndarray, seq_len: int, what: str) -> int:
    n = num_windows(tokens, seq_len)
    if n < 1:
        raise DataError(
            f"{what} has {len(tokens)} tokens, fewer than one window of seq_len + 1 = "
            f"{seq_len + 1}; use more data or a smaller data.seq_len."
        )
    return n


def _lm_train_batch(indices: np.ndarray, tokens: np.ndarray, rows: slice, seq_len: int) -> dict:
    starts = indices[rows, None] * seq_len
    return {"tokens": tokens[starts + np.arange(seq_len + 1)].astype(np.int32)}


def lm_train_dataset(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite LM batches `{'tokens': int32[local, seq_len + 1]}` (see the module docstring)."""
    n = _check_windows(tokens, seq_len, "the training split")
    rows = _global_rows(global_batch_size, process_index, process_count)
    batch = functools.partial(_lm_train_batch, tokens=tokens, rows=rows, seq_len=seq_len)
    return _shuffled_batches(n, seed, global_batch_size).map(batch)


def _lm_eval_batch(
    b: int, tokens: np.ndarray, n: int, rows: slice, global_batch_size: int, seq_len: int
) -> dict:
    window = b * global_batch_size + np.arange(rows.start, rows.stop)
    valid = window < n
    starts = np.where(valid, window, 0)[:, None] * seq_len
    batch = tokens[starts + np.arange(seq_len + 1)].astype(np.int32) * valid[:, None]
    mask = np.broadcast_to(valid[:, None], (len(window), seq_len)).astype(np.int32)
    return {"tokens": batch, "mask": mask}


def lm_eval_dataset(
    tokens: np.ndarray,
    *,
    seq_len: int,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Finite LM batches in order, every window once; the last global batch is zero-padded and
    its padding rows have `mask` 0."""
    n = _check_windows(tokens, seq_len, "the validation split")
    rows = _global_rows(global_batch_size, process_index, process_count)
    batch = functools.partial(
        _lm_eval_batch,
        tokens=tokens,
        n=n,
        rows=rows,
        global_batch_size=global_batch_size,
        seq_len=seq_len,
    )
    return grain.MapDataset.range(-(-n // global_batch_size)).map(batch)


# ---------------------------------------------------------------------------- translation


@dataclasses.dataclass(frozen=True)
class PairTokens:
    """Tokenised translation pairs and how to lay them out in fixed-length rows."""

    src: Ragged
    tgt: Ragged
    max_len: int  # row length; a sequence gets max_len - 1 tokens plus BOS or EOS
    bos_id: int
    eos_id: int

    def check_lengths(self, truncate: bool, what: str) -> None:
        """Logs how many pairs get truncated, or raises if `truncate` is False."""
        too_long = np.flatnonzero(
            (self.src.lengths >= self.max_len) | (self.tgt.lengths >= self.max_len)
        )
        if len(too_long) and not truncate:
            i = int(too_long[0])
            raise DataError(
                f"{len(too_long)} pair(s) in {what} exceed seq_len={self.max_len} with BOS/EOS "
                f"(pair {i}: {len(self.src[i])} source, {len(self.tgt[i])} target tokens); "
                "raise data.seq_len or set data.truncate=True."
            )
        if len(too_long):
            log.info(
                "%s: truncated %d of %d pairs to %d tokens",
                what,
                len(too_long),
                len(self.src),
                self.max_len,
            )

    def batch(self, rows: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of pair indices (empty = padding row) -> the translation batch dict."""
        out = {k: np.zeros((len(rows), self.max_len), np.int32) for k in TRANSLATION_KEYS}
        for r, pair_ids in enumerate(rows):
            s0 = t0 = 0
            for segment, p in enumerate(pair_ids, start=1):
                src, tgt = self.src[p][: self.max_len - 1], self.tgt[p][: self.max_len - 1]
                s1, t1 = s0 + len(src) + 1, t0 + len(tgt) + 1
                out["src"][r, s0 : s1 - 1] = src
                out["src"][r, s1 - 1] = self.eos_id
                out["tgt_in"][r, t0] = self.bos_id
                out["tgt_in"][r, t0 + 1 : t1] = tgt
                out["tgt_out"][r, t0 : t1 - 1] = tgt
                out["tgt_out"][r, t1 - 1] = self.eos_id
                out["src_segment_ids"][r, s0:s1] = segment
                out["tgt_segment_ids"][r, t0:t1] = segment
                out["src_positions"][r, s0:s1] = np.arange(s1 - s0)
                out["tgt_positions"][r, t0:t1] = np.arange(t1 - t0)
                s0, t0 = s1, t1
        return out

    def pack(self, seed: int, open_rows: int = 16) -> list[np.ndarray]:
        """Pairs (in a seeded random order) packed first-fit into rows of `max_len`.

        Only the newest `open_rows` rows take more pairs, which keeps packing linear. The packing
        is fixed for the run; segment masking makes a row equivalent to its pairs alone, and
        the rows are still reshuffled every epoch.
        """
        src_len = np.minimum(self.src.lengths + 1, self.max_len)
        tgt_len = np.minimum(self.tgt.lengths + 1, self.max_len)
        rows: list[list[int]] = []
        used: list[list[int]] = []  # [src, tgt] tokens used, parallel to rows
        for p in np.random.default_rng(seed).permutation(len(self.src)):
            s, t = int(src_len[p]), int(tgt_len[p])
            for r in range(max(0, len(rows) - open_rows), len(rows)):
                if used[r][0] + s <= self.max_len and used[r][1] + t <= self.max_len:
                    rows[r].append(int(p))
                    used[r][0] += s
                    used[r][1] += t
                    break
            else:
                rows.append([int(p)])
                used.append([s, t])
        return [np.asarray(r) for r in rows]


def _translation_train_batch(
    indices: np.ndarray, pairs: PairTokens, rows: list[np.ndarray], local: slice
) -> dict:
    return pairs.batch([rows[i] for i in indices[local]])


def translation_train_dataset(
    pairs: PairTokens,
    *,
    global_batch_size: int,
    seed: int,
    pack: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite translation batches, one pair per row or packed (see the module docstring)."""
    local = _global_rows(global_batch_size, process_index, process_count)
    if len(pairs.src) == 0:
        raise DataError("the training split has no pairs; check data.corpus.")
    rows = pairs.pack(seed) if pack else [np.array([i]) for i in range(len(pairs.src))]
    batch = functools.partial(_translation_train_batch, pairs=pairs, rows=rows, local=local)
    return _shuffled_batches(len(rows), seed, global_batch_size).map(batch)


def _translation_eval_batch(
    b: int, pairs: PairTokens, local: slice, global_batch_size: int
) -> dict:
    first = b * global_batch_size
    ids = range(first + local.start, first + local.stop)
    return pairs.batch([np.array([i] if i < len(pairs.src) else [], np.int64) for i in ids])


def translation_eval_dataset(
    pairs: PairTokens,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Finite translation batches in order, one pair per row; the last global batch is padded
    with empty rows (all segment ids 0)."""
    local = _global_rows(global_batch_size, process_index, process_count)
    if len(pairs.src) == 0:
        raise DataError("the validation split has no pairs; check data.corpus.")
    batch = functools.partial(
        _translation_eval_batch, pairs=pairs, local=local, global_batch_size=global_batch_size
    )
    return grain.MapDataset.range(-(-len(pairs.src) // global_batch_size)).map(batch)


# ---------------------------------------------------------------------------- entry point
@dataclasses.dataclass
class Data:
    """What the trainer needs: tokenizer, train iterator, evaluation batches."""

    corpus_kind: str  # 'lm' or 'translation': which task the batches are for
    tokenizer: Tokenizer
    train_iter: grain.DatasetIterator  # infinite, checkpointable, this process's rows
    eval_dataset: grain.MapDataset  # finite, batched, this process's rows
    eval_pairs: list[tuple[str, str]] | None = None  # raw validation (src, tgt), translation only

    def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """A fresh pass over the validation batches, the first `max_batches` if given."""
        ds = self.eval_dataset if max_batches is None else self.eval_dataset[:max_batches]
        return iterator(ds)


def _training_texts(corpus: Corpus) -> list[str]:
    train = corpus.splits["train"]
    return [t for pair in train for t in pair] if corpus.kind == "translation" else train


def _resolve_tokenizer(data_cfg: DataConfig, corpus: Corpus, saved: Path | None) -> Tokenizer:
    """The tokenizer at `saved` if there is one, else GPT-2's or one trained on the train split
    (then written to `saved`)."""
    kind = data_cfg.tokenizer
    if saved is not None and saved.is_file():
        tokenizer = Tokenizer.load(saved)
        if tokenizer.kind != kind:
            raise DataError(
                f"{saved} is a {tokenizer.kind} tokenizer but data.tokenizer={kind!r}; use a "
                "new workdir or the matching data.tokenizer."
            )
        return tokenizer
    if kind == "char":
        tokenizer = Tokenizer.train_char(_training_texts(corpus))
    elif kind == "bpe":
        tokenizer = Tokenizer.train_bpe(_training_texts(corpus), data_cfg.vocab_size)
    else:  # gpt2 (DataConfig allows no other)
        directory = Path(data_cfg.gpt2_vocab).expanduser()
        tokenizer = Tokenizer.from_gpt2_files(directory / "vocab.json", directory / "merges.txt")
    if saved is not None:
        tokenizer.save(saved)
    return tokenizer


def make_data(
    data_cfg: DataConfig | Any,
    *,
    global_batch_size: int,
    seed: int,
    workdir: str | None,
    process_index: int = 0,
    process_count: int = 1,
) -> Data:
    """Builds tokenizer, train iterator and evaluation batches from the `data` config section
    (a `DataConfig`, or a mapping of its fields: missing ones take their defaults).

    The tokenizer comes from the run directory's tokenizer file when present (a resumed run
    keeps its vocabulary), otherwise it is trained on the training split only and saved there.
    Token arrays are cached under `data.cache_dir`.
    """
    from transformer.rundir import RunDir

    if not isinstance(data_cfg, DataConfig):
        data_cfg = DataConfig(**(data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else data_cfg))
    local_batch_size(global_batch_size, process_index, process_count)  # fail fast
    seq_len = data_cfg.seq_len
    cache_dir = Path(data_cfg.cache_dir or default_cache_dir()).expanduser()
    corpus = load_corpus(data_cfg.corpus, text_field=data_cfg.text_field, cache_dir=str(cache_dir))
    saved = RunDir(workdir).tokenizer_path if workdir else None
    tokenizer = _resolve_tokenizer(data_cfg, corpus, saved)
    shard = dict(process_index=process_index, process_count=process_count)
    if corpus.kind == "lm":
        train = lm_train_dataset(
            lm_tokens(corpus, "train", tokenizer, cache_dir),
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            seed=seed,
            **shard,
        )
        evaluation = lm_eval_dataset(
            lm_tokens(corpus, "validation", tokenizer, cache_dir),
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            **shard,
        )
        return Data("lm", tokenizer, iterator(train), evaluation)

    def split_pairs(split: str) -> PairTokens:
        src, tgt = pair_tokens(corpus, split, tokenizer, cache_dir)
        pairs = PairTokens(src, tgt, seq_len, tokenizer.bos_id, tokenizer.eos_id)
        pairs.check_lengths(data_cfg.truncate, f"{corpus.name} {split}")
        return pairs

    train = translation_train_dataset(
        split_pairs("train"),
        global_batch_size=global_batch_size,
        seed=seed,
        pack=data_cfg.pack,
        **shard,
    )
    evaluation = translation_eval_dataset(
        split_pairs("validation"), global_batch_size=global_batch_size, **shard
    )
    return Data("translation", tokenizer, iterator(train), evaluation, corpus.splits["validation"])
