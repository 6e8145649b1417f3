"""Tokenizers on Hugging Face `tokenizers`: character level, byte-level BPE, GPT-2's vocabulary
and the `tokenizer.json` of a pretrained model (Llama, Mistral, SmolLM, ...).

All kinds are one `Tokenizer` class wrapping a `tokenizers.Tokenizer`, saved as a single
`tokenizer.json`. Trained kinds share their special ids so models and batches do not care which
one produced the tokens; pretrained ones keep their own:

| token   | char | bpe | gpt2 (and its family, e.g. SmolLM) | hf (Llama, Mistral)           |
| ------- | ---- | --- | ---------------------------------- | ----------------------------- |
| `<pad>` | 0    | 0   | none (pad with 0, mask)            | none (pad with 0, mask)       |
| `<bos>` | 1    | 1   | `<|endoftext|>` (50256 in GPT-2's) | `<|begin_of_text|>` or `<s>`  |
| `<eos>` | 2    | 2   | `<|endoftext|>` (50256 in GPT-2's) | `<|end_of_text|>` or `</s>`   |
| `<unk>` | 3    | -   | -                                  | -                             |

`encode` never adds special tokens itself; the data pipeline adds BOS/EOS where a task wants them.
Special-token strings that occur in user text are encoded as ordinary text, so no input can forge
an EOS and `decode(encode(s)) == s` holds for any text the vocabulary covers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

from transformer.errors import DataError
from transformer.files import write_text_atomic

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
GPT2_EOT = "<|endoftext|>"
CHAR_SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0..3, in this order
BPE_SPECIALS = (PAD, BOS, EOS)  # ids 0..2; byte-level BPE covers every byte so needs no unk
BYTE_ALPHABET_SIZE = 256
# (BOS, EOS) of pretrained tokenizers, by the first pair a tokenizer.json has: Llama 3, Llama 2
# and Mistral, then <|endoftext|> (a BPE with it is the 'gpt2' kind; another model is 'hf').
PRETRAINED_SPECIALS = (("<|begin_of_text|>", "<|end_of_text|>"), ("<s>", "</s>"), (GPT2_EOT,) * 2)


TOKENIZER = "tokenizer.json"  # its file name in a run directory


def text_pieces(text: str, chunk_chars: int = 1 << 20) -> list[str]:
    """`text` cut at line ends into pieces of about `chunk_chars` characters.

    The trainers and `encode_batch` parallelise over pieces; one multi-megabyte string would run
    on a single core.
    """
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


class Tokenizer:
    """A trained or loaded tokenizer: `encode`, `decode`, special ids and a one-file format."""

    def __init__(self, hf: tokenizers.Tokenizer):
        """Wraps `hf`; the kind ('char', 'bpe', 'gpt2' or 'hf') is read from its model and
        tokens: 'hf' is any other tokenizer with one of `PRETRAINED_SPECIALS`' BOS/EOS pairs."""
        self.hf = hf
        # Literal "<eos>" etc. in user text stay text; only the pipeline inserts special ids.
        self.hf.encode_special_tokens = True
        model_type = type(hf.model).__name__
        self._bos, self._eos = BOS, EOS
        pretrained = [p for p in PRETRAINED_SPECIALS if None not in map(hf.token_to_id, p)]
        if model_type == "WordLevel" and hf.token_to_id(UNK) == 3:
            self.kind = "char"
        elif model_type == "BPE" and hf.token_to_id(GPT2_EOT) is not None:  # GPT-2's family
            self.kind, self._bos, self._eos = "gpt2", GPT2_EOT, GPT2_EOT
        elif model_type == "BPE" and hf.token_to_id(BOS) == 1:
            self.kind = "bpe"
        elif pretrained:
            self.kind, (self._bos, self._eos) = "hf", pretrained[0]
        else:
            names = ", ".join(" and ".join(pair) for pair in PRETRAINED_SPECIALS)
            raise DataError(
                f"tokenizer with a {model_type} model has no BOS/EOS tokens this library knows "
                f"({names}); train one with Tokenizer.train_char/train_bpe, or add the model's "
                "BOS and EOS to its tokenizer.json as special tokens."
            )

    # ---------------------------------------------------------------- construction
    @classmethod
    def train_char(cls, texts: Iterable[str]) -> Tokenizer:
        """Character-level vocabulary: every character of `texts`, plus `<unk>` for unseen ones."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise DataError("cannot train a tokenizer on empty text; check the training corpus.")
        vocab = {tok: i for i, tok in enumerate(CHAR_SPECIALS)}
        for ch in sorted(chars):  # sorted: the same corpus always gives the same ids
            vocab[ch] = len(vocab)
        hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        # One pre-token per code point ([\s\S] because '.' skips newlines); Fuse joins on decode.
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens(list(CHAR_SPECIALS))
        return cls(hf)

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """GPT-2-style byte-level BPE with `vocab_size` entries; any Unicode text round-trips."""
        minimum = BYTE_ALPHABET_SIZE + len(BPE_SPECIALS)
        if vocab_size < minimum:
            raise DataError(
                f"vocab_size={vocab_size} is too small for byte-level BPE; set data.vocab_size "
                f">= {minimum} (256 bytes + {len(BPE_SPECIALS)} special tokens)."
            )
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(BPE_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
            show_progress=False,
        )
        seen_chars = 0

        def counted() -> Iterator[str]:
            nonlocal seen_chars
            for text in texts:
                for piece in text_pieces(text):
                    seen_chars += len(piece)
                    yield piece

        hf.train_from_iterator(counted(), trainer)
        if not seen_chars:
            raise DataError("cannot train a tokenizer on empty text; check the training corpus.")
        return cls(hf)

    @classmethod
    def from_gpt2_files(
        cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike
    ) -> Tokenizer:
        """GPT-2's byte-level BPE from its `vocab.json` and `merges.txt` (local files only)."""
        for path in (vocab_json, merges_txt):
            if not Path(path).is_file():
                raise DataError(
                    f"GPT-2 vocabulary file {path} does not exist; set data.gpt2_vocab to a "
                    "directory holding vocab.json and merges.txt."
                )
        hf = tokenizers.Tokenizer(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        if hf.token_to_id(GPT2_EOT) is None:
            raise DataError(f"{vocab_json} has no {GPT2_EOT} entry; is it GPT-2's vocab.json?")
        hf.add_special_tokens([GPT2_EOT])  # already in the vocabulary, so it keeps its id
        return cls(hf)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Reads a `tokenizer.json` written by `save` (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist; train one or fix the path.")
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike) -> None:
        """Writes `tokenizer.json` to `path` (a file, or a directory) atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER
        # Atomic: a concurrent reader (another host, a sampler) never sees half a file.
        write_text_atomic(path, self.to_json())

    def to_json(self) -> str:
        """The `tokenizer.json` text; also the tokenizer's identity for cache keys."""
        return self.hf.to_str()

    # ---------------------------------------------------------------- ids
    @property
    def pad_id(self) -> int | None:
        """Padding id (0), or None for GPT-2, which has no pad token."""
        return self.hf.token_to_id(PAD)

    @property
    def bos_token(self) -> str:
        """The beginning-of-sequence token's text (`<bos>`, `<|endoftext|>`, `<s>`, ...)."""
        return self._bos

    @property
    def eos_token(self) -> str:
        """The end-of-sequence token's text."""
        return self._eos

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id: 1, 50256 (`<|endoftext|>`) for GPT-2, the model's own for
        'hf'."""
        return self.hf.token_to_id(self._bos)

    @property
    def eos_id(self) -> int:
        """End-of-sequence id: 2, 50256 (`<|endoftext|>`) for GPT-2, the model's own for 'hf'."""
        return self.hf.token_to_id(self._eos)

    @property
    def unk_id(self) -> int | None:
        """Unknown-character id (3) for the char kind; None for byte-level kinds."""
        return self.hf.token_to_id(UNK) if self.kind == "char" else None

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (all ids are below this)."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_rendered(self, text: str) -> tokenizers.Encoding:
        """The encoding (ids and character offsets) of text a chat template rendered: special
        tokens in it ARE special, as `apply_chat_template` tokenises; no BOS/EOS added."""
        self.hf.encode_special_tokens = False
        try:
            return self.hf.encode(text, add_special_tokens=False)
        finally:
            self.hf.encode_special_tokens = True

    def add_special_tokens(self, tokens: list[str]) -> None:
        """Adds `tokens` (e.g. a chat template's markers) as special tokens with new ids."""
        self.hf.add_special_tokens(tokens)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` over many texts, in parallel on all cores."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, skipping special tokens (pad, bos, eos, unk)."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"
