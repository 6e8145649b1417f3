"""GPT-2 configs <-> our `ModelConfig`, and the errors GPT-2 conversion raises.

`config_from_hf` refuses GPT-2 variants our GPT would compute differently rather than convert
them silently; `hf_config_from` refuses models that are not a GPT-2. `transformers` (the hf
extra) is imported only when a `GPT2Config` is built.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from transformer.config import ConfigError, ModelConfig, preset

# GPT2Config's defaults, for config.json files that leave a field out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "activation_function": "gelu_new",
    "resid_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "attn_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,
}
# All three compute GELU's tanh approximation, which is our `activation='gelu'`.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_GPT2_EOT = 50256  # GPT-2's <|endoftext|>, its BOS and EOS


class ConvertError(ValueError):
    """A checkpoint or config cannot be converted; the message names the problem and the fix."""


class MissingDependencyError(ConvertError, ImportError):
    """An optional package (the hf extra) is not installed."""


def require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"Hugging Face conversion needs the '{module.split('.')[0]}' package; "
            'install the hf extra: pip install -e ".[hf]"'
        ) from e


def _hf_fields(hf_config: Any) -> dict[str, Any]:
    """A GPT2Config (or any object with `to_dict`) or a config.json mapping, as a plain dict."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ConvertError(
        f"expected a transformers config (GPT2Config, LlamaConfig) or a config.json dict, got "
        f"{type(hf_config).__name__}"
    )


def check_model_type(fields: Mapping[str, Any], where: str) -> None:
    model_type = fields.get("model_type")
    if model_type != "gpt2":
        raise ConvertError(
            f"{where} has model_type={model_type!r}; only 'gpt2' (GPT2LMHeadModel, GPT2Model) "
            "checkpoints convert to our GPT"
        )


def config_from_hf(hf_config: Any, *, scan_layers: bool = False) -> ModelConfig:
    """Our `ModelConfig` for a GPT-2 config (a `transformers.GPT2Config` or config.json dict).

    GPT-2 variants our GPT cannot compute (other activations, attention scaled by layer index,
    cross-attention, an untied output layer) raise `ConvertError` rather than convert silently
    into a different function. GPT-2 has separate embedding and residual dropout; ours has one
    `dropout_rate`, taken from `resid_pdrop` (inference does not depend on it).
    """
    fields = _hf_fields(hf_config)
    check_model_type(fields, "the Hugging Face config")
    values = {**_HF_DEFAULTS, **fields}
    get = values.get
    problems = []
    if get("activation_function") not in _TANH_GELUS:
        problems.append(
            f"activation_function={get('activation_function')!r} (supported: "
            f"{', '.join(_TANH_GELUS)}, GELU's tanh approximation)"
        )
    if not get("scale_attn_weights"):
        problems.append("scale_attn_weights=False (our attention always scales by 1/sqrt(h))")
    if get("scale_attn_by_inverse_layer_idx"):
        problems.append("scale_attn_by_inverse_layer_idx=True (not supported)")
    if get("add_cross_attention"):
        problems.append("add_cross_attention=True (our GPT has no cross-attention)")
    if not get("tie_word_embeddings"):
        problems.append("tie_word_embeddings=False (only tied output embeddings are supported)")
    # reorder_and_upcast_attn only changes the order and precision of the same product; our
    # attention scores are float32 already, so it converts as the same function.
    if problems:
        raise ConvertError("this GPT-2 config cannot be converted: " + "; ".join(problems))
    try:
        return preset(
            "gpt2_small",
            vocab_size=get("vocab_size"),
            d_model=get("n_embd"),
            num_heads=get("n_head"),
            num_decoder_layers=get("n_layer"),
            d_ff=get("n_inner") or 4 * get("n_embd"),  # None (the default) means 4 d
            max_len=get("n_positions"),
            norm_epsilon=float(get("layer_norm_epsilon")),
            dropout_rate=float(get("resid_pdrop")),
            attention_dropout_rate=float(get("attn_pdrop")),
            init_std=float(get("initializer_range")),
            scan_layers=scan_layers,
        )
    except ConfigError as e:
        raise ConvertError(f"the GPT-2 config gives an invalid model config: {e}") from e


def export_problems(cfg: ModelConfig) -> list[str]:
    """What stops `cfg` from being a GPT-2, each with the value GPT-2 needs."""
    wanted = {
        "num_encoder_layers": 0,
        "norm_position": "pre",
        "norm_type": "layernorm",
        "activation": "gelu",
        "positions": "learned",
        "tie_embeddings": True,
        "scale_embeddings": False,
        "use_bias": True,
    }
    return [
        f"model.{field}={getattr(cfg, field)!r} (GPT-2 needs {value!r})"
        for field, value in wanted.items()
        if getattr(cfg, field) != value
    ]


def export_vocab_size(cfg: ModelConfig, vocab_size: int | None) -> int:
    if vocab_size is None:
        return cfg.vocab_size
    if not 0 < vocab_size <= cfg.vocab_size:
        raise ConvertError(
            f"vocab_size={vocab_size} must be in [1, model.vocab_size={cfg.vocab_size}]: export "
            "can only drop padded embedding rows"
        )
    return vocab_size


def hf_config_from(cfg: ModelConfig, *, vocab_size: int | None = None) -> Any:
    """The `transformers.GPT2Config` of `cfg`; `vocab_size` drops padded embedding rows.

    BOS/EOS are GPT-2's <|endoftext|> (50256) when the vocabulary has that id, else unset.
    """
    problems = export_problems(cfg)
    if problems:
        raise ConvertError(
            "this model cannot be exported as GPT-2: " + "; ".join(problems) + "; export needs "
            "a config like preset('gpt2_small', ...)"
        )
    vocab = export_vocab_size(cfg, vocab_size)
    eot = _GPT2_EOT if vocab > _GPT2_EOT else None
    transformers = require("transformers")
    return transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=cfg.max_len,
        n_embd=cfg.d_model,
        n_layer=cfg.num_decoder_layers,
        n_head=cfg.num_heads,
        n_inner=cfg.d_ff,
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout_rate,
        embd_pdrop=cfg.dropout_rate,
        attn_pdrop=cfg.attention_dropout_rate,
        layer_norm_epsilon=cfg.norm_epsilon,
        initializer_range=cfg.init_std or 0.02,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
        architectures=["GPT2LMHeadModel"],
        dtype="float32",  # export writes float32 whatever model.param_dtype is
    )
