"""Corpora of any size: streamed documents in every input format, token shards prepared unit by
unit (in parallel commands, after a kill), and training from them."""

import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_python

from transformer.data import documents
from transformer.data.config import DataConfig
from transformer.data.corpora import load_corpus
from transformer.data.pipeline import make_data, prepare_corpus
from transformer.data.shards import TokenShards, prepare_shards
from transformer.data.tokenizer import Tokenizer
from transformer.errors import DataError

DOCS = [f"Document {i}: {'é to be or not ✓ ' * (i + 3)}\nline two of {i}.\n" for i in range(10)]


def read_split(corpus, split: str) -> list[str]:
    """Documents of a split, rebuilt from the pieces the units stream."""
    docs, current = [], []
    for unit in corpus.units()[split]:
        for piece, ends in unit.pieces():
            current.append(piece)
            if ends:
                docs.append("".join(current))
                current = []
    assert not current
    return docs


def write_formats(tmp_path: Path) -> dict[str, str]:
    """DOCS in every input format: spec -> corpus."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    specs = {}
    for i, doc in enumerate(DOCS):  # text: one document per file, plain and gzip
        (tmp_path / "txt").mkdir(exist_ok=True)
        (tmp_path / "txt" / f"{i:02d}.txt").write_text(doc)
        (tmp_path / "gz").mkdir(exist_ok=True)
        (tmp_path / "gz" / f"{i:02d}.txt.gz").write_bytes(gzip.compress(doc.encode()))
    specs["text"] = f"text:{tmp_path}/txt/*.txt"
    specs["text.gz"] = f"text:{tmp_path}/gz/*.txt.gz"
    lines = "\n".join(json.dumps({"id": i, "text": d}) for i, d in enumerate(DOCS)) + "\n\n"
    (tmp_path / "one.jsonl").write_text(lines)
    (tmp_path / "one.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "one.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    for suffix in ("jsonl", "jsonl.gz", "jsonl.zst"):
        specs[suffix] = f"jsonl:{tmp_path}/one.{suffix}"
    table = pa.table({"id": list(range(10)), "text": DOCS})
    pq.write_table(table, tmp_path / "one.parquet", row_group_size=3)
    specs["parquet"] = f"parquet:{tmp_path}/one.parquet"
    datasets.Dataset.from_dict({"text": DOCS, "id": list(range(10))}).save_to_disk(
        str(tmp_path / "hf_one")
    )
    specs["hf"] = f"hf:{tmp_path}/hf_one"
    split = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": DOCS[:9]}),
        validation=datasets.Dataset.from_dict({"text": DOCS[9:]}),
    )
    split.save_to_disk(str(tmp_path / "hf_dict"))
    specs["hf dict"] = f"hf:{tmp_path}/hf_dict"
    return specs


def test_every_input_format_streams_the_same_documents_and_held_out_tail(tmp_path):
    pytest.importorskip("pyarrow", reason="parquet and saved datasets need the dev extra")
    pytest.importorskip("datasets", reason="writing a saved dataset needs the dev extra")
    for name, spec in write_formats(tmp_path).items():
        corpus = load_corpus(spec)
        assert corpus.kind == "lm", name
        assert read_split(corpus, "train") == DOCS[:9], name
        assert read_split(corpus, "validation") == DOCS[9:], name


def test_one_text_file_holds_out_its_tail_from_a_line_start(tmp_path):
    text = "".join(f"line {i} with ünïcode\n" for i in range(200))
    (tmp_path / "one.txt").write_bytes(b"\xef\xbb\xbf" + text.encode())  # with a BOM
    corpus = load_corpus(f"text:{tmp_path}/one.txt")
    (train,), (held_out,) = read_split(corpus, "train"), read_split(corpus, "validation")
    assert train + held_out == text and held_out.startswith("line ")
    share = len(held_out.encode()) / len(text.encode())
    assert 0.1 <= share <= 0.2  # the last line end in the 80-90% stretch of the bytes


def test_big_documents_stream_in_whole_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "PIECE_BYTES", 64)
    lined = "".join(f"ä✓ line {i}\n" for i in range(100))
    unbroken = "ü✓" * 500  # no line end at all: pieces end mid-line, never mid-character
    for name, text in (("lined", lined), ("unbroken", unbroken)):
        path = tmp_path / f"{name}.txt"
        path.write_text(text)
        pieces = list(documents.read_pieces(documents.Source(str(path), "text")))
        assert "".join(p for p, _ in pieces) == text and len(pieces) > 5
        assert [ends for _, ends in pieces] == [False] * (len(pieces) - 1) + [True]
        assert all(len(p.encode()) <= 5 * 64 for p, _ in pieces)


def test_token_shards_index_like_the_flat_array():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 500, n).astype(np.uint16) for n in (7, 0, 1, 13, 5)]
    shards, flat = TokenShards(parts, [1] * len(parts)), np.concatenate(parts)
    assert len(shards) == len(flat) == 26
    index = rng.integers(0, 26, (4, 9))
    np.testing.assert_array_equal(shards[index], flat[index])
    np.testing.assert_array_equal(shards.to_array(), flat)
    with pytest.raises(IndexError):
        shards[np.array([26])]


# ---------------------------------------------------------------------------- prepare
def text_files(directory: Path, count: int, size: int) -> str:
    """`count` text files of about `size` characters each: a `text:` corpus spec."""
    directory.mkdir(parents=True, exist_ok=True)
    words = "the quick brown fox jumps over a lazy dog and thinks of naught".split()
    rng = np.random.default_rng(1)
    for i in range(count):
        n = size // 5
        text = " ".join(words[j] for j in rng.integers(0, len(words), n))
        (directory / f"part{i:03d}.txt").write_text(f"File {i}.\n{text}\n")
    return f"text:{directory}/*.txt"


def data_config(corpus: str, cache: Path, **fields) -> DataConfig:
    fields = {"tokenizer": "bpe", "vocab_size": 300, "seq_len": 16, **fields}
    return DataConfig(corpus=corpus, cache_dir=str(cache), **fields)


def directory_files(directory: Path) -> dict[str, str]:
    """Every file of a prepared directory (no temporary ones): name -> sha256."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if not p.name.startswith(".")
    }


@pytest.fixture(scope="module")
def corpus_spec(tmp_path_factory) -> str:
    return text_files(tmp_path_factory.mktemp("corpus"), count=24, size=6000)


def test_four_shard_commands_equal_one_run_and_train_the_same(corpus_spec, tmp_path):
    one = prepare_corpus(data_config(corpus_spec, tmp_path / "one", shard_mb=0.01))
    assert one.report.units_done == one.report.units_total >= 8
    reports = [
        prepare_corpus(
            data_config(corpus_spec, tmp_path / "four", shard_mb=0.01), shard=i, num_shards=4
        ).report
        for i in range(4)
    ]
    assert [len(r.units_missing) > 0 for r in reports] == [True, True, True, False]
    assert sum(r.units_done for r in reports) == one.report.units_total
    assert directory_files(reports[-1].directory) == directory_files(one.report.directory)
    train = TokenShards.open(one.report.directory, "train", tokenizer=one.tokenizer)
    assert train.num_documents == 22 and len(train) == one.report.tokens - len(
        TokenShards.open(one.report.directory, "validation")
    )
    text = one.tokenizer.decode(train.to_array())
    assert text.startswith("File 0.\n") and "File 21." in text and "File 22." not in text

    # Training reads the four commands' shards exactly as the one-shot ones, nothing re-prepared.
    batches = []
    for cache in ("one", "four"):
        data = make_data(
            data_config(corpus_spec, tmp_path / cache, shard_mb=0.01),
            global_batch_size=4,
            seed=0,
            tokenizer_path=None,
        )
        batches.append([next(data.train_iter)["tokens"] for _ in range(30)])
    np.testing.assert_array_equal(np.stack(batches[0]), np.stack(batches[1]))


def test_training_from_prepared_shards_matches_the_implicit_preparation(corpus_spec, tmp_path):
    from transformer.train.run import train_and_evaluate

    sys.path.insert(0, str(ROOT / "configs"))
    try:
        import tiny
    finally:
        sys.path.pop(0)
    config = tiny.get_config()
    config.data.update(corpus=corpus_spec, shard_mb=0.01, tokenizer="char")
    config.train.update(num_steps=6, log_every_steps=3, eval_every_steps=6, sample_tokens=0)
    config.checkpoint.every_steps = 6

    def losses(cache: str, shards: int) -> list[float]:
        config.data.cache_dir = str(tmp_path / cache)
        workdir = tmp_path / f"run-{cache}"
        for shard in range(shards):  # what N `python -m transformer.prepare` commands do
            prepare_corpus(
                config.data,
                tokenizer_path=workdir / "tokenizer.json",
                shard=shard,
                num_shards=shards,
            )
        train_and_evaluate(config, str(workdir))
        records = map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
        return [(r.get("train_loss"), r.get("val_loss")) for r in records]

    assert losses("implicit", 0) == losses("sharded", 3)


def test_a_prepare_killed_mid_run_resumes_without_losing_or_repeating_documents(tmp_path):
    spec = text_files(tmp_path / "corpus", count=60, size=40000)
    env = {**os.environ, "TRANSFORMER_DATA_CACHE": str(tmp_path / "killed")}
    command = [
        sys.executable,
        "-m",
        "transformer.prepare",
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        f"--config.data.corpus={spec}",
        "--config.data.shard_mb=0.04",
    ]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "killed").glob("tokens/*/train-00002.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "prepare ended too early"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (directory,) = (tmp_path / "killed" / "tokens").iterdir()
    total = len(json.loads((directory / "plan.json").read_text())["units"])
    done_before = len(list(directory.glob("*-?????.json")))
    assert 3 <= done_before < total

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{total - done_before} unit(s) prepared, {done_before} already there" in again.stdout
    config = DataConfig(corpus=spec, cache_dir=str(tmp_path / "whole"), shard_mb=0.04)
    whole = prepare_corpus(config)
    assert directory_files(directory) == directory_files(whole.report.directory)


def test_damaged_or_mismatched_shards_are_one_clear_error(corpus_spec, tmp_path):
    prepared = prepare_corpus(data_config(corpus_spec, tmp_path, shard_mb=0.01))
    directory = prepared.report.directory
    other = Tokenizer.train_char(["abc"])
    with pytest.raises(DataError, match="another tokenizer than this run's"):
        TokenShards.open(directory, "train", tokenizer=other)
    with pytest.raises(DataError, match="written for other data or another tokenizer"):
        prepare_shards(prepared.corpus.units(), other, directory)
    shard = directory / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[5] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-00001.bin does not match its checksum.*rerun"):
        TokenShards.open(directory, "train")
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match="train-00001.bin holds .* bytes.*damaged"):
        TokenShards.open(directory, "train")
    (directory / "train-00001.json").unlink()
    with pytest.raises(DataError, match="unit train-00001 is not prepared yet"):
        TokenShards.open(directory, "train")
    again = prepare_corpus(data_config(corpus_spec, tmp_path, shard_mb=0.01))  # redoes just it
    assert again.report.units_done == 1
    TokenShards.open(directory, "train", tokenizer=prepared.tokenizer)
    with pytest.raises(DataError, match="holds no prepared tokens"):
        TokenShards.open(tmp_path, "train")
    with pytest.raises(DataError, match=r"--shard=4 must be in \[0, --num_shards=4\)"):
        prepare_corpus(data_config(corpus_spec, tmp_path), shard=4, num_shards=4)


def test_bad_inputs_name_the_file_and_the_fix(tmp_path):
    pytest.importorskip("pyarrow", reason="parquet needs the dev extra")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b", "c"]}), tmp_path / "x.parquet")
    with pytest.raises(
        DataError, match=r"x.parquet has no column 'text' \(it has body\).*text_field"
    ):
        read_split(load_corpus(f"parquet:{tmp_path}/x.parquet"), "train")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "y.parquet")
    with pytest.raises(DataError, match=r"y.parquet row 1: 'text' is NoneType, not text"):
        read_split(load_corpus(f"parquet:{tmp_path}/y.parquet"), "train")
    with pytest.raises(DataError, match="no state.json.*save_to_disk"):
        load_corpus(f"hf:{tmp_path}")
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"a.jsonl:3 has no string field 'text'"):
        read_split(load_corpus(f"jsonl:{tmp_path}/a.jsonl"), "validation")
    with pytest.raises(DataError, match="data.eval_corpus='tsv:x' needs data.corpus and"):
        load_corpus(f"jsonl:{tmp_path}/a.jsonl", eval_corpus="tsv:x")


def test_eval_corpus_is_the_held_out_split(tmp_path):
    train_spec = text_files(tmp_path / "train", count=3, size=500)
    eval_spec = text_files(tmp_path / "eval", count=2, size=300)
    corpus = load_corpus(train_spec, eval_corpus=eval_spec)
    assert [d.split("\n")[0] for d in read_split(corpus, "train")] == [
        "File 0.",
        "File 1.",
        "File 2.",
    ]
    assert [d.split("\n")[0] for d in read_split(corpus, "validation")] == ["File 0.", "File 1."]
    (tmp_path / "train.tsv").write_text("".join(f"Hallo {i}\thello {i}\n" for i in range(8)))
    (tmp_path / "newstest.tsv").write_text("Guten Tag\tgood day\n")
    pairs = load_corpus(f"tsv:{tmp_path}/train.tsv", eval_corpus=f"tsv:{tmp_path}/newstest.tsv")
    assert len(pairs.splits["train"]) == 8 and pairs.splits["validation"] == [
        ("Guten Tag", "good day")
    ]


def test_prepare_command_does_one_shard_and_says_what_is_left(corpus_spec, tmp_path):
    command = [
        sys.executable,
        "-m",
        "transformer.prepare",
        f"--config={ROOT / 'configs' / 'tiny.py'}",
        f"--config.data.corpus={corpus_spec}",
        f"--config.data.cache_dir={tmp_path / 'cache'}",
        "--config.data.shard_mb=0.01",
        f"--workdir={tmp_path / 'run'}",
    ]

    def prepare_shard(shard: int) -> subprocess.CompletedProcess:
        return run_python(*command[1:], f"--shard={shard}", "--num_shards=2")

    proc = prepare_shard(1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "still to prepare by other shards" in proc.stdout
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    bad = prepare_shard(2)
    assert bad.returncode == 2 and "--shard=2 must be in [0, --num_shards=2)" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
