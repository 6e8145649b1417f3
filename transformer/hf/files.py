"""Hugging Face model directories read and written: `config.json` and the weights, one
safetensors or `.bin` file or shards with their index, and the state dict of an in-memory model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformer.errors import ConvertError, require
from transformer.hf.engine import Family, check_model_type

WEIGHT_FILES = (
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


def read_weights(directory: Path, what: str) -> dict[str, Any]:
    """The state dict of a `save_pretrained` directory: one file, or shards and their index."""
    for filename in WEIGHT_FILES:
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
        f"{directory} has no {what} weights: expected one of {', '.join(WEIGHT_FILES)}, "
        f"found {present}"
    )


def read_config(directory: Path, what: str) -> dict[str, Any]:
    if not directory.is_dir():
        raise ConvertError(f"{directory} is not a directory; pass a Hugging Face {what} directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    return json.loads(config_path.read_text())


def source_state(family: Family, source: Any, hf_config: Any) -> tuple[Any, Mapping[str, Any]]:
    """(config, state dict) of a directory, an in-memory torch model, or a state dict."""
    config_class, model_classes = family.classes
    if isinstance(source, (str, os.PathLike)):
        if hf_config is not None:
            raise ConvertError("a directory brings its own config.json; do not pass hf_config")
        directory = Path(source)
        fields = read_config(directory, family.label)
        # Before reading gigabytes of weights.
        check_model_type(family, fields, str(directory / "config.json"))
        return fields, read_weights(directory, family.label)
    if isinstance(source, Mapping):
        if hf_config is None:
            raise ConvertError(
                f"a state dict needs its hf_config ({config_class} or config.json dict)"
            )
        return hf_config, source
    if hasattr(source, "state_dict") and hasattr(source, "config"):  # a torch model
        return (source.config if hf_config is None else hf_config), source.state_dict()
    raise ConvertError(
        f"cannot load {family.label} from a {type(source).__name__}; pass a directory, a "
        f"{model_classes}, or a state dict with its config"
    )


def write_directory(out_dir: str | os.PathLike, hf_config: Any, state: Mapping[str, Any]) -> Path:
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
