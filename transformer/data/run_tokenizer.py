"""The tokenizer of a run, and for conversations its chat format: the run's own when it has one
(a resumed run keeps its vocabulary), else trained on the training text, GPT-2's, or a
pretrained model's; written beside each other in the run directory (`tokenizer.json`,
`chat.json`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from transformer.data.chat import CHAT_FILE, ChatFormat
from transformer.data.config import DataConfig
from transformer.data.corpora import Corpus
from transformer.data.tokenizer import Tokenizer
from transformer.errors import DataError
from transformer.files import write_text_atomic


def _unit_texts(unit: object) -> Iterator[str]:
    """A unit's text: its documents' pieces, or its records' message contents."""
    if getattr(unit, "kind", "text") == "text":
        yield from (piece for piece, _ in unit.pieces())
        return
    for _, record in unit.examples():
        if not isinstance(record, dict):
            continue
        for message in record.get("messages") or []:
            if isinstance(message, dict) and isinstance(message.get("content"), str):
                yield message["content"]
        for field in ("prompt", "completion"):
            if isinstance(record.get(field), str):
                yield record[field]


def _sample_texts(units: list, limit_chars: int) -> Iterator[str]:
    """The first `limit_chars` characters of the units' text, piece by piece."""
    seen = 0
    for unit in units:
        for piece in _unit_texts(unit):
            if seen >= limit_chars:
                return
            seen += len(piece)
            yield piece


def _training_texts(data_cfg: DataConfig, corpus: Corpus, units: dict | None) -> Iterable[str]:
    """What a char or BPE tokenizer learns from: the first `data.tokenizer_sample_mb` of the
    training text of a language-model corpus (message contents of a chat corpus); every pair of
    a translation corpus's train split."""
    if units is not None:
        return _sample_texts(units["train"], int(data_cfg.tokenizer_sample_mb * 2**20))
    return [text for pair in corpus.splits["train"] for text in pair]


def _tokenizer(
    data_cfg: DataConfig, corpus: Corpus, units: dict | None, saved: Path | None
) -> Tokenizer:
    """The tokenizer at `saved` if there is one, else GPT-2's, a pretrained model's or one
    trained on the training text."""
    kind = data_cfg.tokenizer
    if saved is not None and saved.is_file():
        tokenizer = Tokenizer.load(saved)
        # A pretrained tokenizer.json may be of any kind (GPT-2's own, or one trained by this
        # library): data.tokenizer=hf accepts each.
        if tokenizer.kind != kind and kind != "hf":
            raise DataError(
                f"{saved} is a {tokenizer.kind} tokenizer but data.tokenizer={kind!r}; use a "
                "new workdir or the matching data.tokenizer."
            )
        return tokenizer
    if kind == "char":
        tokenizer = Tokenizer.train_char(_training_texts(data_cfg, corpus, units))
    elif kind == "bpe":
        tokenizer = Tokenizer.train_bpe(
            _training_texts(data_cfg, corpus, units), data_cfg.vocab_size
        )
    elif kind == "gpt2":
        directory = Path(data_cfg.gpt2_vocab).expanduser()
        tokenizer = Tokenizer.from_gpt2_files(directory / "vocab.json", directory / "merges.txt")
    else:  # hf (DataConfig allows no other): a pretrained model's own tokenizer.json
        tokenizer = Tokenizer.load(Path(data_cfg.tokenizer_path).expanduser())
    return tokenizer


def _chat_format(data_cfg: DataConfig, saved: Path | None) -> ChatFormat:
    """The run's chat format, else the pretrained model's (data.tokenizer=hf with a
    chat_template), else the default (ChatML)."""
    if saved is not None and (saved.parent / CHAT_FILE).is_file():
        return ChatFormat.load(saved.parent / CHAT_FILE)
    if data_cfg.tokenizer == "hf":
        path = Path(data_cfg.tokenizer_path).expanduser()
        own = ChatFormat.from_model_dir(path if path.is_dir() else path.parent)
        if own is not None:
            return own
    return ChatFormat.default()


def resolve_tokenizer(
    data_cfg: DataConfig, corpus: Corpus, units: dict | None, saved: Path | None
) -> tuple[Tokenizer, ChatFormat | None]:
    """(tokenizer, chat format or None) of a run; both written beside `saved` (the run's
    tokenizer.json) when new. A chat corpus's format adds its special tokens to the tokenizer
    when it lacks them (the default's `<|im_start|>` and `<|im_end|>`)."""
    new = saved is None or not saved.is_file()
    tokenizer = _tokenizer(data_cfg, corpus, units, saved)
    chat = _chat_format(data_cfg, saved) if corpus.kind == "chat" else None
    if chat is not None:
        missing = [t for t in chat.special_tokens() if tokenizer.hf.token_to_id(t) is None]
        if missing and not new:
            raise DataError(
                f"{saved} lacks the chat tokens {', '.join(missing)}: it was made for another "
                "kind of corpus; use a new workdir for a chat corpus"
            )
        tokenizer.add_special_tokens(missing)
    if new and saved is not None:
        tokenizer.save(saved)
        if chat is not None:
            write_text_atomic(saved.parent / CHAT_FILE, chat.to_json())
    return tokenizer, chat
