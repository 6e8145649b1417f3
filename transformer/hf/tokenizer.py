"""A run's tokenizer as Hugging Face files: `tokenizer.json` and the `tokenizer_config.json`
that `transformers.AutoTokenizer.from_pretrained` reads (the special tokens, the context length
and, for chat runs, the chat template), so an exported directory is a whole model."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformer.data.chat import ChatFormat
from transformer.data.tokenizer import PAD, UNK, Tokenizer
from transformer.files import write_text_atomic


def tokenizer_config(
    tokenizer: Tokenizer, max_len: int, chat: ChatFormat | None = None
) -> dict[str, object]:
    """`tokenizer_config.json` of a fast tokenizer with our special tokens; no BOS or EOS is
    added by the tokenizer itself (this library adds them where a task wants them). With a chat
    format: its template and tokens, and its end-of-turn token as the EOS, so that
    `generate` stops where an assistant turn ends."""
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    }
    for key, token in (("pad_token", PAD), ("unk_token", UNK)):
        if tokenizer.hf.token_to_id(token) is not None:
            config[key] = token
    if chat is not None:
        config.update(chat.tokens)
        config["eos_token"] = chat.end_of_turn
        config["chat_template"] = chat.template
    return config


def export_tokenizer(
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    *,
    max_len: int,
    chat: ChatFormat | None = None,
) -> Path:
    """Writes `tokenizer.json` and `tokenizer_config.json` into `out_dir`; returns it."""
    out = Path(out_dir)
    tokenizer.save(out / "tokenizer.json")
    config = tokenizer_config(tokenizer, max_len, chat)
    write_text_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    return out
