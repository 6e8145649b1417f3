"""Data pipeline speed: BPE training and encoding on Shakespeare, and LM batch throughput.

    python benchmarks/data_pipeline.py                  # 4k BPE, batch 64 x seq_len 256
    python benchmarks/data_pipeline.py --json out.json  # also write the numbers as JSON

Tokens are prepared into a fresh temporary shard directory, so the encode time is the first-run
cost; the loader is the same grain iterator `make_data` hands to the trainer (background
prefetch included).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from transformer.data.batching import iterator
from transformer.data.bundled import load_shakespeare_plays
from transformer.data.documents import MemoryUnit
from transformer.data.pipeline import lm_train_dataset
from transformer.data.shards import TokenShards, prepare_shards
from transformer.data.tokenizer import Tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batches", type=int, default=2000, help="batches to time the loader on")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    results = measure(args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Times each stage: reading the plays, training the BPE, encoding, then the loader."""
    start = time.perf_counter()
    plays = load_shakespeare_plays()
    train_docs = list(plays["train"].values())
    chars = sum(map(len, train_docs))
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    tokenizer = Tokenizer.train_bpe(train_docs, args.vocab_size)
    train_s = time.perf_counter() - start

    units = {"train": [MemoryUnit("train", train_docs)], "validation": []}
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        prepare_shards(units, tokenizer, Path(cache))
        encode_s = time.perf_counter() - start
        tokens = TokenShards.open(cache, "train").to_array()  # the directory goes away

    loader_s = time_loader(tokens, args.batch_size, args.seq_len, args.batches)
    return {
        "shakespeare_train_chars": chars,
        "load_normalise_s": load_s,
        "bpe_vocab_size": tokenizer.vocab_size,
        "bpe_train_s": train_s,
        "encode_s": encode_s,
        "train_tokens": len(tokens),
        "chars_per_token": chars / len(tokens),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "loader_batches_per_s": args.batches / loader_s,
        "loader_tokens_per_s": args.batches * args.batch_size * args.seq_len / loader_s,
        "cpu_count": os.cpu_count(),
    }


def time_loader(tokens: np.ndarray, batch_size: int, seq_len: int, batches: int) -> float:
    """Seconds the LM loader takes to hand over `batches` batches once warmed up."""
    it = iterator(lm_train_dataset(tokens, seq_len=seq_len, global_batch_size=batch_size, seed=0))
    for _ in range(20):  # warm up the prefetch threads
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return time.perf_counter() - start


def report(results: dict[str, Any]) -> None:
    chars, tokens = results["shakespeare_train_chars"], results["train_tokens"]
    load_s = results["load_normalise_s"]
    rows = [
        ("Shakespeare train text", f"{chars / 1e6:.2f} M chars, read+normalised in {load_s:.2f} s"),
        (f"BPE training ({results['bpe_vocab_size']} vocab)", f"{results['bpe_train_s']:.2f} s"),
        (
            "encode train split",
            f"{results['encode_s']:.2f} s -> {tokens / 1e6:.2f} M tokens "
            f"({results['chars_per_token']:.2f} chars/token)",
        ),
        (
            f"LM loader ({results['batch_size']} x {results['seq_len']})",
            f"{results['loader_batches_per_s']:,.0f} batches/s, "
            f"{results['loader_tokens_per_s'] / 1e6:,.1f} M tokens/s",
        ),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
