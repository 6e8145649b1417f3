"""Hugging Face interoperability: `transformers` GPT-2 and Llama checkpoints <-> our `GPT`.

    cfg, params = load_hf("path/to/gpt2-or-llama")     # config.json + safetensors (or .bin)
    logits = GPT(cfg).apply({"params": params}, tokens)
    export_hf(cfg, params, "out/")                     # *ForCausalLM.from_pretrained("out/")

One API for both families: `load_hf` picks the family by config.json's `model_type`, `export_hf`
by the model's structure (`model.config.FAMILIES`); `family=` names one explicitly. Each family
is a module with the same names (`transformer.hf.gpt2`, `transformer.hf.llama`: `config_from_hf`,
`config_to_hf`, `table`, `FAMILY`); `transformer.hf.engine` maps tensors for both and
`transformer.hf.files` reads and writes their directories.

Importing a directory of safetensors needs only `safetensors`; `.bin` files, in-memory torch
models and export need the hf extra (`pip install -e ".[hf]"`), imported only when needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformer.errors import ConvertError
from transformer.hf import engine, files, gpt2, llama
from transformer.hf.engine import Family, hf_fields
from transformer.model.config import ModelConfig, family_problems
from transformer.model.scan import Params

FAMILIES: dict[str, Family] = {"gpt2": gpt2.FAMILY, "llama": llama.FAMILY}

__all__ = [
    "FAMILIES",
    "config_from_hf",
    "config_to_hf",
    "export_hf",
    "family_for",
    "load_hf",
    "params_from_hf",
    "params_to_hf",
]


def _family_by_type(fields: Mapping[str, Any], where: str) -> Family:
    model_type = fields.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = "; ".join(
        f"{' and '.join(map(repr, f.model_types))} ({f.label})" for f in FAMILIES.values()
    )
    raise ConvertError(f"{where} has model_type={model_type!r}; supported: {supported}")


def _named(family: str) -> Family:
    if family not in FAMILIES:
        raise ConvertError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[family]


def family_for(cfg: ModelConfig, family: str | None = None) -> Family:
    """The family `cfg` exports as: `family` if given, else the one whose structure `cfg` has.
    ConvertError naming what stops it otherwise."""
    if family is not None:
        return _named(family)
    for candidate in FAMILIES.values():
        if not family_problems(cfg, candidate.name):
            return candidate
    reasons = "; ".join(
        f"as {f.label}: {', '.join(family_problems(cfg, f.name))}" for f in FAMILIES.values()
    )
    raise ConvertError(f"this model is neither a GPT-2 nor a Llama, so it cannot export: {reasons}")


def config_from_hf(hf_config: Any, *, scan_layers: bool = False) -> ModelConfig:
    """Our `ModelConfig` for a GPT-2 or Llama config (a transformers config or config.json)."""
    family = _family_by_type(hf_fields(hf_config), "the Hugging Face config")
    return family.config_from_hf(hf_config, scan_layers=scan_layers)


def config_to_hf(cfg: ModelConfig, *, family: str | None = None, **options: Any) -> Any:
    """The transformers config of `cfg` (`vocab_size`, `bos_token_id`, `eos_token_id`)."""
    return family_for(cfg, family).config_to_hf(cfg, **options)


def params_from_hf(state_dict: Mapping[str, Any], cfg: ModelConfig) -> Params:
    """Our params (float32 NumPy) from the state dict of the model `cfg` describes."""
    return engine.params_from_state_dict(family_for(cfg), state_dict, cfg)


def params_to_hf(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    *,
    vocab_size: int | None = None,
    family: str | None = None,
) -> dict[str, Any]:
    """The *ForCausalLM state dict (float32 NumPy) of our params, unrolled or scanned."""
    return engine.state_dict_from_params(family_for(cfg, family), cfg, params, vocab_size)


def load_hf(
    source: str | os.PathLike | Any,
    hf_config: Any = None,
    *,
    family: str | None = None,
    pad_vocab_to: int | None = None,
    scan_layers: bool = False,
) -> tuple[ModelConfig, Params]:
    """`(cfg, params)` for our GPT from a Hugging Face GPT-2 or Llama (or sliding-window-free
    Mistral), the family chosen by the checkpoint's `model_type` unless `family` names it.

    `source` is a directory written by `save_pretrained` (config.json plus model.safetensors,
    pytorch_model.bin, or sharded versions with their index), an in-memory model (e.g.
    `GPT2LMHeadModel`, `LlamaForCausalLM`, or their bare `*Model`), or a state dict, in which
    case `hf_config` (a transformers config or config.json dict) is required. `pad_vocab_to`
    adds zero embedding rows (and lm_head columns) up to that size (GPT-2's 50257 -> 50304 for
    fast matmuls); `scan_layers` returns the stacked tree of `scan_layers=True` models.
    """
    if family is not None:
        chosen = _named(family)
    elif isinstance(source, (str, os.PathLike)):
        config_path = Path(source) / "config.json"
        fields = files.read_config(Path(source), "GPT-2 or Llama")
        chosen = _family_by_type(fields, str(config_path))
    elif hf_config is not None or hasattr(source, "config"):
        chosen = _family_by_type(
            hf_fields(source.config if hf_config is None else hf_config),
            "the Hugging Face config",
        )
    else:
        raise ConvertError(
            "load_hf needs a directory, a Hugging Face model, or a state dict with its "
            "hf_config (a GPT2Config, LlamaConfig or config.json dict)"
        )
    fields, state_dict = files.source_state(chosen, source, hf_config)
    cfg = chosen.config_from_hf(fields, scan_layers=scan_layers)
    cfg = engine.pad_vocab(cfg, pad_vocab_to)
    return cfg, engine.params_from_state_dict(chosen, state_dict, cfg)


def export_hf(
    cfg: ModelConfig,
    params: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    family: str | None = None,
    vocab_size: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Writes `config.json` and `model.safetensors` (float32) that the family's
    `*ForCausalLM.from_pretrained(out_dir)` loads without missing or unexpected keys. `params`
    may be unrolled or scanned; `vocab_size` drops padded embedding rows; BOS/EOS ids go into
    the config. Nothing is written if the model or its params do not fit. Returns the directory.
    """
    chosen = family_for(cfg, family)
    hf_config = chosen.config_to_hf(
        cfg, vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id
    )
    state = engine.state_dict_from_params(chosen, cfg, params, vocab_size)
    return files.write_directory(out_dir, hf_config, state)
