"""The `data` section of a run config: which corpus, which tokenizer, how long a sequence.

Checked once, when built: a wrong value is a `ConfigError` naming the field, the value and the fix.
The comment after each field is its documentation (`train.py --help` prints it).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from transformer.errors import check_fields, one_of

TOKENIZERS = ("char", "bpe", "gpt2", "hf")


def default_cache_dir() -> Path:
    """`$TRANSFORMER_DATA_CACHE`, or `~/.cache/transformer`."""
    return Path(os.environ.get("TRANSFORMER_DATA_CACHE") or "~/.cache/transformer").expanduser()


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpus: str = "shakespeare"  # shakespeare, bible_en_de, KIND:GLOB (KIND text, jsonl, chat, ...)
    eval_corpus: str = ""  # held-out files of the same kind; '' = the last ~10% of corpus
    tokenizer: str = "char"  # char | bpe | gpt2 (data.gpt2_vocab) | hf (data.tokenizer_path)
    vocab_size: int = 4096  # BPE target size (ignored for char and gpt2)
    seq_len: int = 256  # LM context; for translation the source and target max length
    text_field: str = "text"  # field (jsonl) or column (parquet, hf) holding the text
    gpt2_vocab: str = ""  # directory with vocab.json + merges.txt for tokenizer=gpt2
    tokenizer_path: str = ""  # tokenizer=hf: a model directory's tokenizer.json (or the file)
    cache_dir: str = ""  # tokenised corpora and downloads; '' = $TRANSFORMER_DATA_CACHE
    shard_mb: float = 64.0  # input MB per token shard (the unit of `transformer.prepare` work)
    tokenizer_sample_mb: float = 100.0  # char/bpe tokenizers learn from this much training text
    pad_vocab_to_multiple_of: int = 64  # embedding rows rounded up for fast matmuls
    pack: bool = False  # translation, chat, instruct: several examples per row (segment ids)
    truncate: bool = True  # translation: cut pairs longer than seq_len (False: error)
    skip_bad_records: bool = False  # chat/instruct: skip and count bad records (False: error)

    def __post_init__(self) -> None:
        ok, choices = one_of(self.tokenizer, TOKENIZERS)
        gpt2_dir = os.path.expanduser(self.gpt2_vocab)
        hf_path = os.path.expanduser(self.tokenizer_path)
        if os.path.isdir(hf_path):
            hf_path = os.path.join(hf_path, "tokenizer.json")
        check_fields(
            "data",
            self,
            [
                ("corpus", bool(self.corpus), "name a corpus, e.g. shakespeare or text:DIR/*.txt"),
                ("tokenizer", ok, choices),
                ("seq_len", self.seq_len >= 2, "must be at least 2"),
                ("vocab_size", self.tokenizer != "bpe" or self.vocab_size > 0, "must be > 0"),
                ("pad_vocab_to_multiple_of", self.pad_vocab_to_multiple_of >= 1, "must be >= 1"),
                ("shard_mb", self.shard_mb > 0, "must be positive"),
                ("tokenizer_sample_mb", self.tokenizer_sample_mb > 0, "must be positive"),
                (
                    "gpt2_vocab",
                    self.tokenizer != "gpt2" or os.path.isdir(gpt2_dir),
                    "tokenizer=gpt2 needs the directory holding GPT-2's vocab.json and "
                    "merges.txt; pass --config.data.gpt2_vocab=DIR",
                ),
                (
                    "tokenizer_path",
                    self.tokenizer != "hf" or os.path.isfile(hf_path),
                    "tokenizer=hf needs a tokenizer.json, or the model directory holding one "
                    "(e.g. the checkpoint.init_from directory); pass "
                    "--config.data.tokenizer_path=DIR",
                ),
            ],
        )

    @property
    def cache_path(self) -> Path:
        """Where tokenised corpora and downloads go: `cache_dir`, else `default_cache_dir()`."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    @classmethod
    def from_any(cls, data_cfg: Any) -> DataConfig:
        """A `DataConfig`, or one from a mapping of its fields (missing ones take their
        defaults), e.g. a run's saved `config.json` section or a ConfigDict."""
        if isinstance(data_cfg, DataConfig):
            return data_cfg
        values = data_cfg.to_dict() if hasattr(data_cfg, "to_dict") else dict(data_cfg)
        return cls(**values)
