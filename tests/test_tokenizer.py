"""Tokenizers: exact round trips, special ids, the one-file format, vocabulary size math."""

import json

import pytest

from transformer.data.bundled import load_shakespeare
from transformer.data.config import DataConfig
from transformer.data.tokenizer import Tokenizer
from transformer.errors import DataError
from transformer.model.config import padded_vocab_size
from transformer.train.config import RunConfig

GERMAN = "Grüße aus Köln: Die Straße ist süß, Äpfel über Öl.\n\tFuß und Maß!"
UNSEEN = "emoji 😀🚀, Chinese 中文字, Greek αβγ, math ∑∞ and \r\n line ends"


@pytest.fixture(scope="module")
def shakespeare() -> str:
    """About 300 KB of training text: enough to learn merges, quick to train on."""
    return load_shakespeare()[0][:300_000]


@pytest.fixture(scope="module")
def bpe(shakespeare: str) -> Tokenizer:
    return Tokenizer.train_bpe([shakespeare, GERMAN], vocab_size=1000)


def test_char_round_trip_and_unknown(shakespeare: str) -> None:
    tok = Tokenizer.train_char([shakespeare, GERMAN])
    assert (tok.kind, tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == ("char", 0, 1, 2, 3)
    assert tok.vocab_size == 4 + len(set(shakespeare + GERMAN))
    for text in (shakespeare[:20_000], GERMAN, "  two  spaces\n\nand blank lines\n"):
        ids = tok.encode(text)
        assert len(ids) == len(text)  # one id per character
        assert tok.decode(ids) == text
    # Characters never seen map to <unk>, and decode skips it.
    assert tok.encode("a😀b") == [tok.encode("a")[0], 3, tok.encode("b")[0]]
    assert tok.decode(tok.encode("a😀b")) == "ab"
    # Ids follow sorted characters, so the same corpus always gives the same vocabulary.
    assert [tok.encode(c)[0] for c in "\t\n "] == [4, 5, 6]


def test_special_token_text_is_ordinary_text(bpe: Tokenizer) -> None:
    char = Tokenizer.train_char(["<eos> <bos> <pad>"])
    for tok in (char, bpe):
        ids = tok.encode("a <eos> b")
        assert tok.eos_id not in ids
        assert tok.decode(ids) == "a <eos> b"


def test_bpe_round_trip_any_unicode(bpe: Tokenizer, shakespeare: str) -> None:
    assert (bpe.kind, bpe.pad_id, bpe.bos_id, bpe.eos_id, bpe.unk_id) == ("bpe", 0, 1, 2, None)
    assert bpe.vocab_size == 1000
    sample = shakespeare[-5000:]
    ids = bpe.encode(sample)
    assert len(ids) < len(sample) / 2  # merges were learned: over 2 characters per token
    for text in (sample, GERMAN, UNSEEN, ""):
        assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode_batch([GERMAN, UNSEEN]) == [bpe.encode(GERMAN), bpe.encode(UNSEEN)]


def test_bpe_vocab_too_small() -> None:
    with pytest.raises(DataError, match=">= 259"):
        Tokenizer.train_bpe(["some text"], vocab_size=258)
    with pytest.raises(DataError, match="empty"):
        Tokenizer.train_bpe([""], vocab_size=300)
    with pytest.raises(DataError, match="empty"):
        Tokenizer.train_char([])


def test_save_load_identical(tmp_path, bpe: Tokenizer, shakespeare: str) -> None:
    char = Tokenizer.train_char([shakespeare])
    for tok in (char, bpe):
        path = tmp_path / tok.kind / "tokenizer.json"
        path.parent.mkdir()
        tok.save(path)
        assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]
        loaded = Tokenizer.load(path.parent)  # a directory works too
        assert loaded.kind == tok.kind and loaded.vocab_size == tok.vocab_size
        assert (loaded.pad_id, loaded.bos_id, loaded.eos_id) == (tok.pad_id, tok.bos_id, 2)
        for text in (GERMAN, UNSEEN, "x <eos> y"):
            assert loaded.encode(text) == tok.encode(text)
            assert loaded.decode(loaded.encode(text)) == tok.decode(tok.encode(text))
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "nowhere")


def test_gpt2_from_local_files(tmp_path, bpe: Tokenizer) -> None:
    # A GPT-2-shaped vocabulary: bytes and merges, then <|endoftext|> as the last id.
    bpe.hf.model.save(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab = {t: i - 3 for t, i in vocab.items() if t not in ("<pad>", "<bos>", "<eos>")}
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert tok.kind == "gpt2" and tok.vocab_size == 998
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (None, 997, 997, None)
    assert tok.decode(tok.encode(GERMAN + UNSEEN)) == GERMAN + UNSEEN
    assert tok.decode([*tok.encode("Hi"), tok.eos_id]) == "Hi"
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").kind == "gpt2"
    with pytest.raises(DataError, match="gpt2_vocab"):
        Tokenizer.from_gpt2_files(tmp_path / "missing.json", tmp_path / "merges.txt")


def test_padded_vocab_size(bpe: Tokenizer) -> None:
    assert padded_vocab_size(50257) == 50304  # nanoGPT's number
    assert padded_vocab_size(50257, multiple=128) == 50304
    assert padded_vocab_size(64) == 64
    char = Tokenizer.train_char(["abc"])
    assert (char.vocab_size, padded_vocab_size(7), padded_vocab_size(7, 4)) == (7, 64, 8)
    assert padded_vocab_size(bpe.vocab_size) == 1024
    # A run sizes its embedding the same way when model.vocab_size is 0.
    gpt = {"vocab_size": 0, "num_encoder_layers": 0}
    run = RunConfig(model=gpt, data=DataConfig(pad_vocab_to_multiple_of=4))
    assert run.model_config(char.vocab_size).vocab_size == 8
    # No input produces an id at or beyond vocab_size, so padded rows are never targets.
    for tok in (char, bpe):
        assert max(tok.encode(GERMAN + UNSEEN + "abc")) < tok.vocab_size


@pytest.mark.parametrize(
    "bos, eos",
    [("<|begin_of_text|>", "<|end_of_text|>"), ("<s>", "</s>")],  # Llama 3; Llama 2, Mistral
)
def test_a_pretrained_models_tokenizer_json_keeps_its_special_ids(tmp_path, bos, eos) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unused>", bos, eos])
    hf.train_from_iterator([GERMAN] * 10, trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)  # a model directory holding tokenizer.json
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id) == ("hf", 1, 2, None)
    assert tok.decode(tok.encode(GERMAN)) == GERMAN
    assert bos not in tok.decode([tok.bos_id, *tok.encode("Hi"), tok.eos_id])
    # data.tokenizer=hf reads it from data.tokenizer_path; without one the config says so.
    assert DataConfig(tokenizer="hf", tokenizer_path=str(tmp_path)).tokenizer == "hf"
    with pytest.raises(ValueError, match="data.tokenizer_path"):
        DataConfig(tokenizer="hf")
    # A tokenizer with no BOS/EOS this library knows is refused, naming the ones it knows.
    hf = HFTokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(DataError, match="<s> and </s>"):
        Tokenizer(hf)
