"""Hugging Face interoperability: `transformers` GPT-2 and Llama checkpoints <-> our `GPT`.

    cfg, params = load_hf_gpt2("path/to/gpt2")        # config.json + model.safetensors (or .bin)
    logits = GPT(cfg).apply({"params": params}, tokens)
    export_hf_gpt2(cfg, params, "out/", vocab_size=50257)   # GPT2LMHeadModel.from_pretrained
    cfg, params = load_hf_llama("path/to/llama")      # LlamaForCausalLM, Mistral without window
    export_hf_llama(cfg, params, "out/")              # LlamaForCausalLM.from_pretrained
    cfg, params = load_hf("path/to/either")           # by config.json's model_type

This module reads and writes Hugging Face directories and models. How a config maps is
`transformer.gpt2_config` / `transformer.llama_config`, how each tensor maps (the name tables)
is `transformer.gpt2_params` / `transformer.llama_params`, and how scanned and unrolled layers
convert is `transformer.scan_layers`; their public names can be imported from here as well.

Importing a directory of safetensors needs only `safetensors`; `.bin` files, in-memory torch
models and export need the hf extra (`pip install -e ".[hf]"`), imported only when needed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transformer.config import ModelConfig
from transformer.gpt2_config import (
    ConvertError,
    MissingDependencyError,
    _hf_fields,
    check_model_type,
    config_from_hf,
    hf_config_from,
    require,
)
from transformer.gpt2_params import hf_state_dict_from_params, params_from_hf_state_dict
from transformer.llama_config import MODEL_TYPES as LLAMA_MODEL_TYPES
from transformer.llama_config import (
    check_llama_model_type,
    config_from_hf_llama,
    hf_llama_config_from,
)
from transformer.llama_params import (
    hf_llama_state_dict_from_params,
    params_from_hf_llama_state_dict,
)
from transformer.scan_layers import Params, stack_layers, unstack_layers

CheckModelType = Callable[[Mapping[str, Any], str], None]

__all__ = [
    "ConvertError",
    "MissingDependencyError",
    "Params",
    "config_from_hf",
    "config_from_hf_llama",
    "export_hf_gpt2",
    "export_hf_llama",
    "hf_config_from",
    "hf_llama_config_from",
    "hf_llama_state_dict_from_params",
    "hf_state_dict_from_params",
    "load_hf",
    "load_hf_gpt2",
    "load_hf_llama",
    "params_from_hf_llama_state_dict",
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


def _read_weights(directory: Path, what: str = "GPT-2") -> dict[str, Any]:
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
        f"{directory} has no {what} weights: expected one of {', '.join(_WEIGHT_FILES)}, "
        f"found {present}"
    )


def _read_config(directory: Path, what: str = "GPT-2") -> dict[str, Any]:
    if not directory.is_dir():
        raise ConvertError(f"{directory} is not a directory; pass a Hugging Face {what} directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    return json.loads(config_path.read_text())


def _read_directory(
    directory: Path, what: str = "GPT-2", check: CheckModelType = check_model_type
) -> tuple[dict[str, Any], dict[str, Any]]:
    fields = _read_config(directory, what)
    check(fields, str(directory / "config.json"))  # before reading gigabytes of weights
    return fields, _read_weights(directory, what)


# What each family calls its config and model classes, for the messages.
_CLASSES = {
    "GPT-2": ("GPT2Config", "GPT2LMHeadModel/GPT2Model"),
    "Llama": ("LlamaConfig", "LlamaForCausalLM/LlamaModel"),
}


def _source_state(
    source: Any, hf_config: Any, what: str, check: CheckModelType
) -> tuple[Any, Mapping[str, Any]]:
    """(config, state dict) of a directory, an in-memory torch model, or a state dict."""
    config_class, model_classes = _CLASSES[what]
    if isinstance(source, (str, os.PathLike)):
        if hf_config is not None:
            raise ConvertError("a directory brings its own config.json; do not pass hf_config")
        return _read_directory(Path(source), what, check)
    if isinstance(source, Mapping):
        if hf_config is None:
            raise ConvertError(
                f"a state dict needs its hf_config ({config_class} or config.json dict)"
            )
        return hf_config, source
    if hasattr(source, "state_dict") and hasattr(source, "config"):  # a torch model
        return (source.config if hf_config is None else hf_config), source.state_dict()
    raise ConvertError(
        f"cannot load {what} from a {type(source).__name__}; pass a directory, a "
        f"{model_classes}, or a state dict with its config"
    )


def _pad_vocab(cfg: ModelConfig, pad_vocab_to: int | None) -> ModelConfig:
    if pad_vocab_to is None:
        return cfg
    if pad_vocab_to < cfg.vocab_size:
        raise ConvertError(
            f"pad_vocab_to={pad_vocab_to} is smaller than the checkpoint's vocabulary "
            f"({cfg.vocab_size}); padding cannot drop rows"
        )
    return dataclasses.replace(cfg, vocab_size=pad_vocab_to)


def _write_directory(out_dir: str | os.PathLike, hf_config: Any, state: Mapping[str, Any]) -> Path:
    """`config.json` and a float32 `model.safetensors`, as `save_pretrained` writes them."""
    safetensors_numpy = require("safetensors.numpy")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(out))
    # transformers refuses safetensors files whose metadata does not name their format.
    safetensors_numpy.save_file(
        dict(state), str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    return out


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
    hf_config, state_dict = _source_state(source, hf_config, "GPT-2", check_model_type)
    cfg = _pad_vocab(config_from_hf(hf_config, scan_layers=scan_layers), pad_vocab_to)
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
    return _write_directory(out_dir, hf_config, state)


def load_hf_llama(
    source: str | os.PathLike | Any,
    hf_config: Any = None,
    *,
    pad_vocab_to: int | None = None,
    scan_layers: bool = False,
) -> tuple[ModelConfig, Params]:
    """`(cfg, params)` for our GPT from a Hugging Face Llama (or sliding-window-free Mistral).

    `source` is a directory written by `save_pretrained` (config.json plus model.safetensors,
    pytorch_model.bin, or sharded versions with their index), an in-memory `LlamaForCausalLM`
    or `LlamaModel`, or a state dict, in which case `hf_config` (LlamaConfig or config.json
    dict) is required. `pad_vocab_to` adds zero embedding rows (and lm_head columns) up to
    that size; `scan_layers` returns the stacked tree of `scan_layers=True` models.
    """
    hf_config, state_dict = _source_state(source, hf_config, "Llama", check_llama_model_type)
    cfg = _pad_vocab(config_from_hf_llama(hf_config, scan_layers=scan_layers), pad_vocab_to)
    return cfg, params_from_hf_llama_state_dict(state_dict, cfg)


def export_hf_llama(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Writes `config.json` and `model.safetensors` (float32) that
    `transformers.LlamaForCausalLM.from_pretrained(out_dir)` loads without missing or
    unexpected keys. `params` may be unrolled or scanned; `vocab_size` drops padded embedding
    rows; BOS/EOS ids go into the config. Returns the directory.
    """
    hf_config = hf_llama_config_from(
        cfg, vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id
    )
    state = hf_llama_state_dict_from_params(cfg, params, vocab_size=vocab_size)
    return _write_directory(out_dir, hf_config, state)


def load_hf(
    source: str | os.PathLike | Any,
    hf_config: Any = None,
    *,
    pad_vocab_to: int | None = None,
    scan_layers: bool = False,
) -> tuple[ModelConfig, Params]:
    """`load_hf_gpt2` or `load_hf_llama`, chosen by the checkpoint's `model_type`."""
    if isinstance(source, (str, os.PathLike)):
        fields = _read_config(Path(source), "GPT-2 or Llama")
        where = str(Path(source) / "config.json")
    elif hf_config is not None or hasattr(source, "config"):
        fields = _hf_fields(source.config if hf_config is None else hf_config)
        where = "the Hugging Face config"
    else:
        raise ConvertError(
            "load_hf needs a directory, a Hugging Face model, or a state dict with its "
            "hf_config (a GPT2Config, LlamaConfig or config.json dict)"
        )
    model_type = fields.get("model_type")
    if model_type == "gpt2":
        loader = load_hf_gpt2
    elif model_type in LLAMA_MODEL_TYPES:
        loader = load_hf_llama
    else:
        raise ConvertError(
            f"{where} has model_type={model_type!r}; supported: 'gpt2' (GPT-2), and "
            f"{' and '.join(map(repr, LLAMA_MODEL_TYPES))} (Llama)"
        )
    return loader(source, hf_config, pad_vocab_to=pad_vocab_to, scan_layers=scan_layers)
