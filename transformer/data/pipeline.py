"""Data pipeline entry point `make_data`, the batch formats of both tasks, and the language-model
batches.

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

The other parts of the pipeline (in `transformer.data`): `corpora` names the corpora (`documents`
streams the user's files), `shards` tokenises a language-model corpus once into
memory-mapped token shards (`prepare_corpus` here; `python -m transformer.prepare` for big ones),
`token_cache` does the same for translation pairs, `batching` cuts global batches into this
process's rows, and `pairs` lays out the translation rows.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import numpy as np

from transformer.data.batching import global_rows, iterator, local_batch_size, shuffled_batches
from transformer.data.chat import ChatFormat, ChatRenderer, ExampleEncoder
from transformer.data.config import DataConfig
from transformer.data.corpora import Corpus, load_corpus
from transformer.data.examples import Examples, examples_eval_dataset, examples_train_dataset
from transformer.data.pairs import PairTokens, translation_eval_dataset, translation_train_dataset
from transformer.data.run_tokenizer import resolve_tokenizer
from transformer.data.shards import (
    PrepareReport,
    TokenShards,
    open_examples,
    prepare_shards,
    prepared_dir,
)
from transformer.data.token_cache import pair_tokens
from transformer.data.tokenizer import Tokenizer
from transformer.errors import DataError

_log = logging.getLogger(__name__)


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
    rows = global_rows(global_batch_size, process_index, process_count)
    batch = functools.partial(_lm_train_batch, tokens=tokens, rows=rows, seq_len=seq_len)
    return shuffled_batches(n, seed, global_batch_size).map(batch)


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
    rows = global_rows(global_batch_size, process_index, process_count)
    batch = functools.partial(
        _lm_eval_batch,
        tokens=tokens,
        n=n,
        rows=rows,
        global_batch_size=global_batch_size,
        seq_len=seq_len,
    )
    return grain.MapDataset.range(-(-n // global_batch_size)).map(batch)


# ---------------------------------------------------------------------------- entry point
@dataclasses.dataclass
class Data:
    """What the trainer needs: tokenizer, train iterator, evaluation batches."""

    corpus_kind: str  # 'lm' or 'translation': which task the batches are for
    tokenizer: Tokenizer
    train_iter: grain.DatasetIterator  # infinite, checkpointable, this process's rows
    eval_dataset: grain.MapDataset  # finite, batched, this process's rows
    eval_pairs: list[tuple[str, str]] | None = None  # raw validation (src, tgt), translation only
    chat: ChatFormat | None = None  # chat and instruct corpora: how conversations render
    skipped_records: int = 0  # bad records skipped (data.skip_bad_records)

    def eval_batches(self, max_batches: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """A fresh pass over the validation batches, the first `max_batches` if given."""
        ds = self.eval_dataset if max_batches is None else self.eval_dataset[:max_batches]
        return iterator(ds)


@dataclasses.dataclass
class Prepared:
    """A corpus, its tokenizer and (language models) its token shards' directory."""

    corpus: Corpus
    tokenizer: Tokenizer
    cache_dir: Path
    report: PrepareReport | None = None  # language models and chat: what `prepare` did
    chat: ChatFormat | None = None  # chat and instruct corpora: how conversations render


def open_corpus(data_cfg: DataConfig) -> Corpus:
    """The corpus a `data` config names, with its held-out split (`data.eval_corpus` when given):
    the one place that turns the config into a `Corpus`, for training, preparing and scoring."""
    return load_corpus(
        data_cfg.corpus,
        text_field=data_cfg.text_field,
        cache_dir=str(data_cfg.cache_path),
        eval_corpus=data_cfg.eval_corpus,
        shard_mb=data_cfg.shard_mb,
    )


def held_out_pairs(data_cfg: DataConfig | Any) -> list[tuple[str, str]]:
    """The translation pairs a run never trained on: its corpus's test split where it has one
    (the bundled Bible pairs), else its validation split (`data.eval_corpus`, or the held-out
    files or lines)."""
    data_cfg = DataConfig.from_any(data_cfg)
    corpus = open_corpus(data_cfg)
    if corpus.kind != "translation":
        raise DataError(f"held-out pairs need a translation corpus, not {data_cfg.corpus!r}")
    splits = corpus.splits
    return list(splits.get("test") or splits["validation"])


def prepare_corpus(
    data_cfg: DataConfig | Any,
    *,
    tokenizer_path: str | Path | None = None,
    shard: int = 0,
    num_shards: int = 1,
    log: Callable[[str], None] | None = None,
) -> Prepared:
    """Reads the corpus of the `data` config, resolves its tokenizer (the one at
    `tokenizer_path`, else one trained or loaded and saved there) and tokenises this shard's
    part of it into the cache: for a language model the units `shard, shard + num_shards, ...`
    of its token shards (`transformer.data.shards`); for translation the pair cache (not
    sharded: `num_shards` must be 1)."""
    data_cfg = DataConfig.from_any(data_cfg)
    cache_dir = data_cfg.cache_path
    corpus = open_corpus(data_cfg)
    units = corpus.units() if corpus.kind in ("lm", "chat") else None
    saved = Path(tokenizer_path) if tokenizer_path else None
    tokenizer, chat = resolve_tokenizer(data_cfg, corpus, units, saved)
    if units is None:
        if num_shards != 1:
            raise DataError(
                f"translation corpus {corpus.name!r} is prepared in one piece; drop --num_shards."
            )
        for split in ("train", "validation"):
            pair_tokens(corpus, split, tokenizer, cache_dir)
        return Prepared(corpus, tokenizer, cache_dir)
    extra, encode = {}, None
    if chat is not None:  # the shards depend on the format and where a row ends too
        extra = {
            "chat": json.loads(chat.to_json()),
            "max_tokens": data_cfg.seq_len + 1,
            "skip_bad_records": data_cfg.skip_bad_records,
        }
        renderer = ChatRenderer(chat)
        encode = ExampleEncoder(
            renderer, tokenizer, data_cfg.seq_len + 1, data_cfg.skip_bad_records
        )
    fingerprint = corpus.fingerprint + (json.dumps(extra, sort_keys=True) if extra else "")
    directory = prepared_dir(cache_dir, corpus.name, fingerprint, tokenizer)
    report = prepare_shards(
        units,
        tokenizer,
        directory,
        shard=shard,
        num_shards=num_shards,
        log=log,
        encode_example=encode,
        plan_extra=extra,
    )
    return Prepared(corpus, tokenizer, cache_dir, report, chat)


def make_data(
    data_cfg: DataConfig | Any,
    *,
    global_batch_size: int,
    seed: int,
    tokenizer_path: str | Path | None,
    process_index: int = 0,
    process_count: int = 1,
) -> Data:
    """Builds tokenizer, train iterator and evaluation batches from the `data` config section
    (a `DataConfig`, or a mapping of its fields: missing ones take their defaults).

    The tokenizer comes from `tokenizer_path` (the run directory's) when that file exists (a
    resumed run keeps its vocabulary), otherwise it is trained on the training text only and
    saved there.
    Tokens are prepared once into `data.cache_dir` (`prepare_corpus`; nothing to do when
    `python -m transformer.prepare` already did it) and read memory-mapped from there.
    """
    data_cfg = DataConfig.from_any(data_cfg)
    local_batch_size(global_batch_size, process_index, process_count)  # fail fast
    seq_len = data_cfg.seq_len
    prepared = prepare_corpus(data_cfg, tokenizer_path=tokenizer_path, log=_log.info)
    corpus, tokenizer = prepared.corpus, prepared.tokenizer
    shard = dict(process_index=process_index, process_count=process_count)
    if prepared.chat is not None:
        return _example_data(prepared, data_cfg, global_batch_size, seed, shard)
    if prepared.report is not None:
        directory = prepared.report.directory
        train = lm_train_dataset(
            TokenShards.open(directory, "train", tokenizer=tokenizer),
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            seed=seed,
            **shard,
        )
        evaluation = lm_eval_dataset(
            TokenShards.open(directory, "validation", tokenizer=tokenizer),
            seq_len=seq_len,
            global_batch_size=global_batch_size,
            **shard,
        )
        return Data("lm", tokenizer, iterator(train), evaluation)

    def split_pairs(split: str) -> PairTokens:
        src, tgt = pair_tokens(corpus, split, tokenizer, prepared.cache_dir)
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


def _example_data(
    prepared: Prepared, data_cfg: DataConfig, global_batch_size: int, seed: int, shard: dict
) -> Data:
    """The batches of a chat or instruct corpus (`transformer.data.examples`)."""
    directory, tokenizer = prepared.report.directory, prepared.tokenizer

    def split_examples(split: str) -> tuple[Examples, int]:
        ids, masks, ends, skipped = open_examples(directory, split, tokenizer=tokenizer)
        return Examples(ids, masks, ends, data_cfg.seq_len + 1), skipped

    (train_examples, skipped_train), (eval_examples, skipped_eval) = (
        split_examples("train"),
        split_examples("validation"),
    )
    if skipped_train + skipped_eval:
        _log.info("skipped %d bad records (data.skip_bad_records)", skipped_train + skipped_eval)
    train = examples_train_dataset(
        train_examples, global_batch_size=global_batch_size, seed=seed, pack=data_cfg.pack, **shard
    )
    evaluation = examples_eval_dataset(
        eval_examples, global_batch_size=global_batch_size, pack=data_cfg.pack, **shard
    )
    return Data(
        "chat",
        tokenizer,
        iterator(train),
        evaluation,
        chat=prepared.chat,
        skipped_records=skipped_train + skipped_eval,
    )
