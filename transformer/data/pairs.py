"""Translation batches: tokenised (source, target) pairs laid out in fixed-length rows, one pair
per row or several packed with segment ids (the layout is described in
`transformer.data.pipeline`)."""

from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from transformer.data.batching import first_fit_rows, row_eval_dataset, row_train_dataset
from transformer.data.token_cache import Ragged
from transformer.errors import DataError

log = logging.getLogger(__name__)

# The translation batch: each [b, t] int32 (see `transformer.data.pipeline`).
TRANSLATION_KEYS = (
    "src",
    "tgt_in",
    "tgt_out",
    "src_segment_ids",
    "tgt_segment_ids",
    "src_positions",
    "tgt_positions",
)


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
        order = np.random.default_rng(seed).permutation(len(self.src))
        sizes = np.stack([src_len, tgt_len], axis=1)  # [n, 2]: source and target tokens
        return first_fit_rows(order, sizes, self.max_len, open_rows)


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
    hosts = dict(process_index=process_index, process_count=process_count)
    if len(pairs.src) == 0:
        raise DataError("the training split has no pairs; check data.corpus.")
    rows = pairs.pack(seed) if pack else [np.array([i]) for i in range(len(pairs.src))]
    return row_train_dataset(pairs, rows, global_batch_size=global_batch_size, seed=seed, **hosts)


def translation_eval_dataset(
    pairs: PairTokens,
    *,
    global_batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.MapDataset:
    """Finite translation batches in order, one pair per row; the last global batch is padded
    with empty rows (all segment ids 0)."""
    hosts = dict(process_index=process_index, process_count=process_count)
    if len(pairs.src) == 0:
        raise DataError("the validation split has no pairs; check data.corpus.")
    rows = [np.array([i]) for i in range(len(pairs.src))]
    return row_eval_dataset(pairs, rows, global_batch_size=global_batch_size, **hosts)
