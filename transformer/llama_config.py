"""Llama configs <-> our `ModelConfig`.

`config_from_hf_llama` refuses what our GPT would compute differently rather than convert it
silently, naming every problem at once: RoPE scaling (linear, dynamic, yarn, longrope, llama3),
attention or MLP biases, a `head_dim` other than hidden_size // num_attention_heads, activations
other than SiLU (our SwiGLU), and Mistral's sliding window. Mistral configs without one
(`sliding_window` null, or no shorter than the context) describe Llama's function and tensors,
so they convert too. `pretraining_tp` > 1 only splits Llama's matmuls into slices (the same
function; newer `transformers` ignore it) and is ignored here as well. `hf_llama_config_from`
refuses models that are not Llama-shaped. `transformers` (the hf extra) is imported only when a
`LlamaConfig` is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformer.config import ConfigError, ModelConfig, preset
from transformer.gpt2_config import ConvertError, _hf_fields, export_vocab_size, require

MODEL_TYPES = ("llama", "mistral")
# The config classes' defaults, for config.json files that leave a field out.
_LLAMA_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None: num_attention_heads
    "head_dim": None,  # None: hidden_size // num_attention_heads
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "mlp_bias": False,
}
_DEFAULTS = {
    "llama": _LLAMA_DEFAULTS,
    "mistral": {
        **_LLAMA_DEFAULTS,
        "intermediate_size": 14336,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "sliding_window": 4096,
    },
}


def check_llama_model_type(fields: Mapping[str, Any], where: str) -> None:
    model_type = fields.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConvertError(
            f"{where} has model_type={model_type!r}; only 'llama' (LlamaForCausalLM, "
            "LlamaModel) and 'mistral' checkpoints convert with load_hf_llama"
        )


def _rope(values: Mapping[str, Any]) -> tuple[float, str]:
    """(theta, rope type) from `rope_parameters` (transformers 5) or the older top-level
    `rope_theta` and `rope_scaling` (whose type key was once `type`)."""
    parameters = values.get("rope_parameters") or {}
    scaling = values.get("rope_scaling") or {}
    theta = parameters.get("rope_theta", values.get("rope_theta", 10000.0))
    kind = None
    for source in (parameters, scaling):
        kind = kind or source.get("rope_type") or source.get("type")
    return float(theta), kind or "default"


def config_from_hf_llama(hf_config: Any, *, scan_layers: bool = False) -> ModelConfig:
    """Our `ModelConfig` for a Llama config (a `transformers.LlamaConfig` or config.json dict).

    Every option our GPT cannot compute is named in one `ConvertError`. Llama has no residual
    dropout; `attention_dropout` becomes `attention_dropout_rate`. Grouped-query attention maps
    to `num_kv_heads` (0 when every head has its own keys and values).
    """
    fields = _hf_fields(hf_config)
    check_llama_model_type(fields, "the Hugging Face config")
    values = {**_DEFAULTS[fields["model_type"]], **fields}
    get = values.get
    d, n = get("hidden_size"), get("num_attention_heads")
    kv = get("num_key_value_heads") or n
    theta, rope_type = _rope(values)
    problems = []
    if get("hidden_act") != "silu":
        problems.append(f"hidden_act={get('hidden_act')!r} (supported: 'silu', Llama's SwiGLU)")
    if rope_type != "default":
        problems.append(
            f"rope scaling rope_type={rope_type!r} (supported: 'default', i.e. rope_scaling "
            "null; linear, dynamic, yarn, longrope and llama3 scaling are not implemented)"
        )
    for bias in ("attention_bias", "mlp_bias"):
        if get(bias):
            problems.append(f"{bias}=True (our Llama layers have no biases)")
    if get("head_dim") not in (None, d // n):
        problems.append(
            f"head_dim={get('head_dim')} (our attention needs hidden_size // "
            f"num_attention_heads = {d // n})"
        )
    window = get("sliding_window")
    if window is not None and window < get("max_position_embeddings"):
        problems.append(
            f"sliding_window={window} (our attention sees the whole context; only windows no "
            "shorter than max_position_embeddings convert)"
        )
    if problems:
        raise ConvertError("this Llama config cannot be converted: " + "; ".join(problems))
    try:
        return preset(
            "llama_tiny",
            vocab_size=get("vocab_size"),
            d_model=d,
            num_heads=n,
            num_kv_heads=0 if kv == n else kv,
            d_ff=get("intermediate_size"),
            num_decoder_layers=get("num_hidden_layers"),
            max_len=get("max_position_embeddings"),
            norm_epsilon=float(get("rms_norm_eps")),
            rope_theta=theta,
            tie_embeddings=bool(get("tie_word_embeddings")),
            dropout_rate=0.0,
            attention_dropout_rate=float(get("attention_dropout") or 0.0),
            init_std=float(get("initializer_range")),
            scan_layers=scan_layers,
        )
    except ConfigError as e:
        raise ConvertError(f"the Llama config gives an invalid model config: {e}") from e


def llama_export_problems(cfg: ModelConfig) -> list[str]:
    """What stops `cfg` from being a Llama, each with the value Llama needs."""
    wanted = {
        "num_encoder_layers": 0,
        "norm_position": "pre",
        "norm_type": "rmsnorm",
        "activation": "swiglu",
        "positions": "rope",
        "scale_embeddings": False,
        "use_bias": False,
    }
    return [
        f"model.{field}={getattr(cfg, field)!r} (Llama needs {value!r})"
        for field, value in wanted.items()
        if getattr(cfg, field) != value
    ]


def hf_llama_config_from(
    cfg: ModelConfig,
    *,
    vocab_size: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Any:
    """The `transformers.LlamaConfig` of `cfg`; `vocab_size` drops padded embedding rows.

    BOS/EOS ids belong to the tokenizer, which the model config does not know; pass them, or
    they stay unset (then `generate` runs to `max_new_tokens`).
    """
    problems = llama_export_problems(cfg)
    if problems:
        raise ConvertError(
            "this model cannot be exported as Llama: " + "; ".join(problems) + "; export needs "
            "a config like preset('llama_tiny', ...)"
        )
    vocab = export_vocab_size(cfg, vocab_size)
    transformers = require("transformers")
    return transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_decoder_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_len,
        initializer_range=cfg.init_std or 0.02,
        rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rope_theta,  # transformers 5 moves it into rope_parameters
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        attention_dropout=cfg.attention_dropout_rate,
        mlp_bias=False,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        architectures=["LlamaForCausalLM"],
        dtype="float32",  # export writes float32 whatever model.param_dtype is
    )
