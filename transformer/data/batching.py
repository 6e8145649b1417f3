"""Global batches, the part both tasks share: this process's rows of a global batch, shuffled
epochs of item indices and checkpointable iterators with prefetch."""

from __future__ import annotations

import functools
from typing import Protocol

import grain
import numpy as np

from transformer.errors import DataError

# Two threads overlap batch assembly with the train step; more only contend for the GIL.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


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


def global_rows(global_batch_size: int, process_index: int, process_count: int) -> slice:
    """This process's rows of a global batch."""
    local = local_batch_size(global_batch_size, process_index, process_count)
    return slice(process_index * local, (process_index + 1) * local)


def shuffled_batches(num_items: int, seed: int, global_batch_size: int) -> grain.MapDataset:
    """Infinite stream of global batches of item indices; each epoch a fresh permutation."""
    # shuffle before repeat: grain folds the epoch into the seed, so epochs differ.
    ds = grain.MapDataset.range(num_items).shuffle(seed=seed % 2**32).repeat()
    return ds.batch(global_batch_size)


def first_fit_rows(
    order: np.ndarray, sizes: np.ndarray, capacity: int, open_rows: int = 16
) -> list[np.ndarray]:
    """Items in `order` packed first-fit into rows: item i takes `sizes[i]` ([n, k]: k
    sequences per item, e.g. source and target) of each row's `capacity`. Only the newest
    `open_rows` rows take more items, which keeps packing linear."""
    sizes = np.asarray(sizes, np.int64).reshape(len(sizes), -1)
    rows: list[list[int]] = []
    room: list[np.ndarray] = []
    for i in order:
        for r in range(max(0, len(rows) - open_rows), len(rows)):
            if (sizes[i] <= room[r]).all():
                rows[r].append(int(i))
                room[r] -= sizes[i]
                break
        else:
            rows.append([int(i)])
            room.append(capacity - sizes[i])
    return [np.asarray(r) for r in rows]


class RowBatcher(Protocol):
    """Examples or pairs that make a batch from rows of their indices (empty: a padding row)."""

    def batch(self, rows: list[np.ndarray]) -> dict[str, np.ndarray]: ...


def _train_rows(indices: np.ndarray, source: RowBatcher, rows: list, local: slice) -> dict:
    return source.batch([rows[i] for i in indices[local]])


def row_train_dataset(
    source: RowBatcher,
    rows: list[np.ndarray],
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Infinite global batches of `rows` (each an array of `source`'s indices), every epoch in
    a fresh order; this process builds its own rows of each."""
    local = global_rows(global_batch_size, process_index, process_count)
    batch = functools.partial(_train_rows, source=source, rows=rows, local=local)
    return shuffled_batches(len(rows), seed, global_batch_size).map(batch)


def _eval_rows(b: int, source: RowBatcher, rows: list, local: slice, size: int) -> dict:
    ids = range(b * size + local.start, b * size + local.stop)
    return source.batch([rows[i] if i < len(rows) else np.zeros(0, np.int64) for i in ids])


def row_eval_dataset(
    source: RowBatcher,
    rows: list[np.ndarray],
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Finite global batches of `rows` in order, every one once; the last is padded with empty
    rows."""
    local = global_rows(global_batch_size, process_index, process_count)
    batch = functools.partial(
        _eval_rows, source=source, rows=rows, local=local, size=global_batch_size
    )
    return grain.MapDataset.range(-(-len(rows) // global_batch_size)).map(batch)


def iterator(dataset: grain.MapDataset) -> grain.DatasetIterator:
    """A checkpointable iterator with background prefetch."""
    return iter(dataset.to_iter_dataset(READ_OPTIONS))
