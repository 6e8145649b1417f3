"""GPT-2 interoperability: Hugging Face `transformers` GPT-2 checkpoints <-> our `GPT` parameters.

    cfg, params = load_hf_gpt2("path/to/gpt2")        # config.json + model.safetensors (or .bin)
    logits = GPT(cfg).apply({"params": params}, tokens)
    export_hf_gpt2(cfg, params, "out/", vocab_size=50257)   # GPT2LMHeadModel.from_pretrained

This module reads and writes Hugging Face directories and models. How a config maps is
`transformer.gpt2_config`, how each tensor maps (the name table) is `transformer.gpt2_params`, and
how scanned and unrolled layers convert is `transformer.scan_layers`; their public names can be
imported from here as well.

Importing a directory of safetensors needs only `safetensors`; `.bin` files, in-memory torch
models and export need the hf extra (`pip install -e ".[hf]"`), imported only when needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformer.config import ModelConfig
from transformer.gpt2_config import (
    ConvertError,
    MissingDependencyError,
    check_model_type,
    config_from_hf,
    hf_config_from,
    require,
)
from transformer.gpt2_params import hf_state_dict_from_params, params_from_hf_state_dict
from transformer.scan_layers import Params, stack_layers, unstack_layers

__all__ = [
    "ConvertError",
    "MissingDependencyError",
    "Params",
    "config_from_hf",
    "export_hf_gpt2",
    "hf_config_from",
    "hf_state_dict_from_params",
    "load_hf_gpt2",
    "params_from_hf_state_dict",
    "stack_layers",
    "unstack_layers",
]

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _read_safetensors(path: Path) -> dict[str, Any]:
    numpy_reader = require("safetensors.numpy")
    try:
        return numpy_reader.load_file(str(path))
    except TypeError:  # bfloat16 and float8 have no NumPy dtype; torch reads them
        require("torch")
        return require("safetensors.torch").load_file(str(path))


def _read_bin(path: Path) -> dict[str, Any]:
    torch = require("torch")
    # weights_only: a .bin is a pickle, and unpickling arbitrary objects can run code.
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _read_weights(directory: Path) -> dict[str, Any]:
    """The state dict of a `save_pretrained` directory: one file, or shards and their index."""
    for filename in _WEIGHT_FILES:
        path = directory / filename
        if not path.is_file():
            continue
        read = _read_safetensors if ".safetensors" in filename else _read_bin
        if not filename.endswith(".index.json"):
            return read(path)
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: dict[str, Any] = {}
        for shard in shards:
            state.update(read(directory / shard))
        return state
    present = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
    raise ConvertError(
        f"{directory} has no GPT-2 weights: expected one of {', '.join(_WEIGHT_FILES)}, "
        f"found {present}"
    )


def _read_directory(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not directory.is_dir():
        raise ConvertError(f"{directory} is not a directory; pass a Hugging Face GPT-2 directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    fields = json.loads(config_path.read_text())
    check_model_type(fields, str(config_path))  # before reading gigabytes of weights
    return fields, _read_weights(directory)


def load_hf_gpt2(
    source: str | os.PathLike | Any,
    hf_config: Any = None,
    *,
    pad_vocab_to: int | None = None,
    scan_layers: bool = False,
) -> tuple[ModelConfig, Params]:
    """`(cfg, params)` for our GPT from a Hugging Face GPT-2.

    `source` is a directory written by `save_pretrained` (config.json plus model.safetensors,
    pytorch_model.bin, or sharded versions with their index), an in-memory `GPT2LMHeadModel` or
    `GPT2Model`, or a state dict, in which case `hf_config` (GPT2Config or config.json dict)
    is required. `pad_vocab_to` adds zero embedding rows up to that size (e.g. 50257 -> 50304
    for fast matmuls); `scan_layers` returns the stacked tree of `scan_layers=True` models.
    """
    if isinstance(source, (str, os.PathLike)):
        if hf_config is not None:
            raise ConvertError("a directory brings its own config.json; do not pass hf_config")
        hf_config, state_dict = _read_directory(Path(source))
    elif isinstance(source, Mapping):
        if hf_config is None:
            raise ConvertError("a state dict needs its hf_config (GPT2Config or config.json dict)")
        state_dict = source
    elif hasattr(source, "state_dict") and hasattr(source, "config"):  # a torch GPT-2 model
        if hf_config is None:
            hf_config = source.config
        state_dict = source.state_dict()
    else:
        raise ConvertError(
            f"cannot load GPT-2 from a {type(source).__name__}; pass a directory, a "
            "GPT2LMHeadModel/GPT2Model, or a state dict with its config"
        )
    cfg = config_from_hf(hf_config, scan_layers=scan_layers)
    if pad_vocab_to is not None:
        if pad_vocab_to < cfg.vocab_size:
            raise ConvertError(
                f"pad_vocab_to={pad_vocab_to} is smaller than the checkpoint's vocabulary "
                f"({cfg.vocab_size}); padding cannot drop rows"
            )
        cfg = dataclasses.replace(cfg, vocab_size=pad_vocab_to)
    return cfg, params_from_hf_state_dict(state_dict, cfg)


def export_hf_gpt2(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int | None = None,
) -> Path:
    """Writes `config.json` and `model.safetensors` (float32) that
    `transformers.GPT2LMHeadModel.from_pretrained(out_dir)` loads without missing or
    unexpected keys. `params` may be unrolled or scanned; `vocab_size` drops padded embedding
    rows (e.g. 50304 -> 50257). Returns the directory.
    """
    hf_config = hf_config_from(cfg, vocab_size=vocab_size)
    state = hf_state_dict_from_params(cfg, params, vocab_size=vocab_size)
    safetensors_numpy = require("safetensors.numpy")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(out))
    # transformers refuses safetensors files whose metadata does not name their format.
    safetensors_numpy.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
