"""Preparing corpora of growing size: wall time, peak memory, cores busy, against encode_batch.

    python benchmarks/data_scaling.py                      # 100 MB and 1 GB, BPE 8000
    python benchmarks/data_scaling.py --sizes-mb 20 100    # a quicker look
    python benchmarks/data_scaling.py --json out.json      # also write the numbers as JSON

Each size is a generated corpus of 1 MB text files (lines of Shakespeare drawn at random, so the
words are real and every file differs). `python -m transformer.prepare` runs on it in a fresh
process (BPE trained on the first `data.tokenizer_sample_mb`, then every unit tokenised), timed
and measured from outside: wall seconds, peak resident memory, CPU seconds / wall seconds (how
many cores were busy). The reference, in the same command and on the same cores, is `tokenizers`'
own `encode_batch` with the same trained tokenizer over the first 100 MB of the same files, in
4 MB batches, timed around the call alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_WRAPPER = """
import atexit, resource, runpy, sys
atexit.register(lambda: print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                              file=sys.stderr))
sys.argv = ["transformer.prepare", *sys.argv[1:]]
runpy.run_module("transformer.prepare", run_name="__main__")
"""


def generate(directory: Path, size_mb: int, seed: int = 0) -> None:
    """`size_mb` files of 1 MB: random lines of the Shakespeare training plays."""
    from transformer.data.bundled import load_shakespeare

    lines = np.array([line for line in load_shakespeare()[0].splitlines() if line.strip()])
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(size_mb):
        text, size = [], 0
        while size < 1 << 20:
            chunk = lines[rng.integers(0, len(lines), 2000)]
            text.extend(chunk)
            size += sum(map(len, chunk)) + len(chunk)
        (directory / f"part{i:05d}.txt").write_text("\n".join(text)[: 1 << 20] + "\n")


def prepare(corpus: Path, cache: Path, workdir: Path, vocab_size: int) -> dict:
    """One `python -m transformer.prepare` in a fresh process, measured from outside."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            _WRAPPER,
            f"--config={ROOT / 'configs' / 'tiny.py'}",
            f"--config.data.corpus=text:{corpus}/*.txt",
            "--config.data.tokenizer=bpe",
            f"--config.data.vocab_size={vocab_size}",
            f"--config.data.cache_dir={cache}",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"prepare failed:\n{proc.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    peak_kb = int(re.search(r"PEAK_RSS_KB (\d+)", proc.stderr).group(1))
    summary = proc.stdout.strip().splitlines()[-1]
    prepare_s = float(re.search(r"in ([\d.]+) s \(", summary).group(1))
    chars = float(re.search(r"from ([\d.]+) M characters", summary).group(1)) * 1e6
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "cores_busy": cpu / wall,
        "peak_rss_mb": peak_kb / 1024,
        "tokenise_s": prepare_s,  # reading + encoding + writing, after the tokenizer is ready
        "tokenise_mb_per_s": chars / prepare_s / 1e6,
        "summary": summary,
    }


def reference(corpus: Path, workdir: Path, limit_mb: int) -> dict:
    """`encode_batch` alone with the run's tokenizer over the first `limit_mb` files."""
    from transformer.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(workdir / "tokenizer.json").hf
    files = sorted(corpus.glob("*.txt"))[:limit_mb]
    seconds = chars = 0.0
    for i in range(0, len(files), 4):
        texts = [f.read_text() for f in files[i : i + 4]]
        start = time.perf_counter()
        tokenizer.encode_batch(texts, add_special_tokens=False)
        seconds += time.perf_counter() - start
        chars += sum(map(len, texts))
    return {"mb": chars / 1e6, "seconds": seconds, "mb_per_s": chars / seconds / 1e6}


def matmul_gflops() -> float:
    """This machine's float32 matmul rate, for context (numpy, all cores)."""
    a = np.random.default_rng(0).standard_normal((1024, 1024), dtype=np.float32)
    a @ a
    start, n = time.perf_counter(), 10
    for _ in range(n):
        a @ a
    return 2 * 1024**3 * n / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--dir", type=Path, help="where to put corpora (default: a temp dir)")
    args = parser.parse_args()

    results = {"cpu_count": os.cpu_count(), "matmul_gflops": matmul_gflops(), "sizes": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        tmp = Path(tmp)
        for size in args.sizes_mb:
            corpus = tmp / f"corpus{size}"
            generate(corpus, size)
            run = prepare(corpus, tmp / f"cache{size}", tmp / f"run{size}", args.vocab_size)
            run["reference"] = reference(corpus, tmp / f"run{size}", min(size, 100))
            run["vs_reference"] = run["tokenise_mb_per_s"] / run["reference"]["mb_per_s"]
            results["sizes"][size] = run
            print(f"{size} MB: {run['summary']}", flush=True)

    print(f"\n{os.cpu_count()} cores, float32 matmul {results['matmul_gflops']:.0f} GFLOP/s")
    print("| corpus | wall s | peak RSS | cores busy | tokenise MB/s | encode_batch MB/s | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size, r in results["sizes"].items():
        print(
            f"| {size} MB | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} MB | {r['cores_busy']:.2f} "
            f"| {r['tokenise_mb_per_s']:.2f} | {r['reference']['mb_per_s']:.2f} "
            f"| {r['vs_reference']:.2f} |"
        )
    sizes = list(results["sizes"])
    if len(sizes) > 1:
        small, big = results["sizes"][sizes[0]], results["sizes"][sizes[-1]]
        print(
            f"\n{sizes[-1]} MB / {sizes[0]} MB: time x{big['wall_s'] / small['wall_s']:.1f} "
            f"for x{sizes[-1] / sizes[0]:.0f} the data"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
