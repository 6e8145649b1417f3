"""Batches of examples with a loss mask (conversations, prompt/completion pairs): each example
whole in a row, one per row or several packed, and the loss on its answer tokens only.

A batch, this process's rows of the global batch, all int32:
  tokens       [b, t + 1]  the examples' ids, each cut to t + 1 tokens, 0 after the last one
  mask         [b, t]      1 where the target tokens[:, 1:] is an answer token of the same
                           example as its input: the loss weights, so the mean is over answer
                           tokens only, whatever the padding and packing
  segment_ids  [b, t]      1, 2, ... for the inputs' examples, 0 for padding: attention stays
                           within an example
  positions    [b, t]      0, 1, ... restarting with every example
Rows are laid out once per run (shuffled and packed first-fit with `data.pack`, in order
otherwise) and reshuffled every epoch, like translation pairs (`transformer.data.pairs`).
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from transformer.data.batching import first_fit_rows, row_eval_dataset, row_train_dataset
from transformer.data.shards import TokenShards
from transformer.errors import DataError


@dataclasses.dataclass(frozen=True)
class Examples:
    """A split's examples: ids and loss masks, and where each example ends."""

    tokens: TokenShards
    masks: TokenShards
    ends: np.ndarray  # int64 [n]: the end of example i in the flat split
    row_len: int  # seq_len + 1 tokens per row

    @functools.cached_property  # read by every batch: computed once
    def starts(self) -> np.ndarray:
        return np.concatenate([[0], self.ends[:-1]]).astype(np.int64)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Tokens of each example in a row: all of it, or the first row_len."""
        return np.minimum(self.ends - self.starts, self.row_len)

    def __len__(self) -> int:
        return len(self.ends)

    def rows(self, pack: bool, seed: int | None) -> list[np.ndarray]:
        """Example indices of each row: one example per row, or (`pack`) as many as fit,
        first fit among the newest rows, in a seeded random order (None: in order)."""
        order = (
            np.arange(len(self))
            if seed is None
            else np.random.default_rng(seed).permutation(len(self))
        )
        if not pack:
            return [np.array([i]) for i in order]
        return first_fit_rows(order, self.lengths, self.row_len)

    def batch(self, rows: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Rows of example indices (empty: a padding row) -> the batch (module docstring)."""
        n, t = len(rows), self.row_len
        tokens = np.zeros((n, t), np.int32)
        answer = np.zeros((n, t), np.int32)
        segments = np.zeros((n, t), np.int32)
        positions = np.zeros((n, t), np.int32)
        starts, lengths = self.starts, self.lengths
        for r, examples in enumerate(rows):
            at = 0
            for segment, i in enumerate(examples, start=1):
                span = np.arange(starts[i], starts[i] + lengths[i])
                tokens[r, at : at + len(span)] = self.tokens[span]
                answer[r, at : at + len(span)] = self.masks[span]
                segments[r, at : at + len(span)] = segment
                positions[r, at : at + len(span)] = np.arange(len(span))
                at += len(span)
        same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
        return {
            "tokens": tokens,
            "mask": (answer[:, 1:] * same).astype(np.int32),
            "segment_ids": segments[:, :-1],
            "positions": positions[:, :-1],
        }


def examples_train_dataset(
    examples: Examples,
    *,
    global_batch_size: int,
    seed: int,
    pack: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite batches of the training examples (see the module docstring)."""
    if len(examples) == 0:
        raise DataError("the training split has no examples; check data.corpus.")
    hosts = dict(process_index=process_index, process_count=process_count)
    rows = examples.rows(pack, seed)
    return row_train_dataset(
        examples, rows, global_batch_size=global_batch_size, seed=seed, **hosts
    )


def examples_eval_dataset(
    examples: Examples,
    *,
    global_batch_size: int,
    pack: bool = False,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Finite batches of the held-out examples in order, every one once; the last global batch
    is padded with empty rows (mask 0)."""
    if len(examples) == 0:
        raise DataError("the validation split has no examples; check data.corpus.")
    hosts = dict(process_index=process_index, process_count=process_count)
    rows = examples.rows(pack, seed=None)
    return row_eval_dataset(examples, rows, global_batch_size=global_batch_size, **hosts)
