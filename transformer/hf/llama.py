"""Llama (`LlamaForCausalLM`, and Mistral without a sliding window): its config mapped to our
`ModelConfig` and back, and its tensors' table for the shared engine (`transformer.hf.engine`).

`config_from_hf` refuses what our GPT would compute differently rather than convert it silently,
naming every problem at once: RoPE scaling (linear, dynamic, yarn, longrope, llama3), attention
or MLP biases, a `head_dim` other than hidden_size // num_attention_heads, activations other
than SiLU (our SwiGLU), and Mistral's sliding window. Mistral configs without one
(`sliding_window` null, or no shorter than the context) describe Llama's function and tensors,
so they convert too. `pretraining_tp` > 1 only splits Llama's matmuls into slices (the same
function; newer `transformers` ignore it) and is ignored here as well. `config_to_hf` refuses
models that are not Llama-shaped. `transformers` (the hf extra) is imported only when a
`LlamaConfig` is built.

Tensor names (HF's nn.Linear weights are [out, in]; our kernels are [in, out], so every kernel
is a transpose and a row-major reshape; q/k weights need no permutation, as our RoPE rotates
halves like HF's `rotate_half`):
  embed_tokens.weight [v, d]                    embed/token_embedding [v, d]
  lm_head.weight [v, d] (untied only)           lm_head/kernel [d, v]
  layers.{i}.input_layernorm.weight [d]         decoder/layers_{i}/norm_self_attention/scale
  layers.{i}.self_attn.q_proj.weight [n h, d]   .../self_attention/qkv/kernel [d, 3, n, h] (q, k, v)
  layers.{i}.self_attn.k_proj.weight [k h, d]     when k == n, else .../query/kernel [d, n, h]
  layers.{i}.self_attn.v_proj.weight [k h, d]     and .../key_value/kernel [d, 2, k, h] (k, v)
  layers.{i}.self_attn.o_proj.weight [d, n h]   .../self_attention/out/kernel [n, h, d]
  layers.{i}.post_attention_layernorm.weight    .../norm_mlp/scale [d]
  layers.{i}.mlp.gate_proj.weight [f, d]        .../mlp/wi_gate/kernel [d, f]
  layers.{i}.mlp.up_proj.weight [f, d]          .../mlp/wi_up/kernel [d, f]
  layers.{i}.mlp.down_proj.weight [d, f]        .../mlp/wo/kernel [f, d]
  norm.weight [d]                               decoder/final_norm/scale [d]
LlamaForCausalLM prefixes all but lm_head with `model.`; LlamaModel's bare names load too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from transformer.errors import ConfigError, ConvertError, require
from transformer.hf.engine import (
    Family,
    Table,
    Tensor,
    check_exportable,
    check_model_type,
    export_vocab_size,
    hf_fields,
)
from transformer.model.config import ModelConfig, preset

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


def config_from_hf(hf_config: Any, *, scan_layers: bool = False) -> ModelConfig:
    """Our `ModelConfig` for a Llama config (a `transformers.LlamaConfig` or config.json dict).

    Every option our GPT cannot compute is named in one `ConvertError`. Llama has no residual
    dropout; `attention_dropout` becomes `attention_dropout_rate`. Grouped-query attention maps
    to `num_kv_heads` (0 when every head has its own keys and values).
    """
    fields = hf_fields(hf_config)
    check_model_type(FAMILY, fields, "the Hugging Face config")
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


def config_to_hf(
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
    check_exportable(
        cfg,
        FAMILY,
        "this model cannot be exported as Llama (export needs a config like "
        "preset('llama_tiny', ...))",
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


def table(cfg: ModelConfig) -> Table:
    """Every tensor but the embedding and lm_head (whose rows depend on vocabulary padding)."""
    d, n, k, h, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.d_ff

    def kernel(*path: str) -> tuple[str, ...]:
        return (*path, "kernel")

    if k == n:  # one kernel: q, k, v at slots 0, 1, 2
        q, q_slot = kernel("self_attention", "qkv"), 0
        kv, k_slot, v_slot = q, 1, 2
    else:  # grouped: a query kernel, and k, v at slots 0, 1 of key_value
        q, q_slot = kernel("self_attention", "query"), None
        kv, k_slot, v_slot = kernel("self_attention", "key_value"), 0, 1
    per_layer = {
        "input_layernorm.weight": ((d,), ("norm_self_attention", "scale"), None, (d,)),
        "self_attn.q_proj.weight": ((n * h, d), q, q_slot, (d, n, h)),
        "self_attn.k_proj.weight": ((k * h, d), kv, k_slot, (d, k, h)),
        "self_attn.v_proj.weight": ((k * h, d), kv, v_slot, (d, k, h)),
        "self_attn.o_proj.weight": ((d, n * h), kernel("self_attention", "out"), None, (n, h, d)),
        "post_attention_layernorm.weight": ((d,), ("norm_mlp", "scale"), None, (d,)),
        "mlp.gate_proj.weight": ((f, d), kernel("mlp", "wi_gate"), None, (d, f)),
        "mlp.up_proj.weight": ((f, d), kernel("mlp", "wi_up"), None, (d, f)),
        "mlp.down_proj.weight": ((d, f), kernel("mlp", "wo"), None, (f, d)),
    }
    out: Table = {"norm.weight": Tensor((d,), ("decoder", "final_norm", "scale"), (d,))}
    for i in range(cfg.num_decoder_layers):
        for name, (hf_shape, path, slot, piece) in per_layer.items():
            path = ("decoder", f"layers_{i}", *path)
            out[f"layers.{i}.{name}"] = Tensor(hf_shape, path, piece, transposed=True, slot=slot)
    return out


FAMILY = Family(
    name="llama",
    label="Llama",
    model_types=MODEL_TYPES,
    classes=("LlamaConfig", "LlamaForCausalLM/LlamaModel"),
    prefix="model.",
    embedding="embed_tokens.weight",
    # Rotary buffers, recomputed from the config: `rotary_emb.inv_freq` (per layer in old files).
    buffers=re.compile(r"(layers\.\d+\.self_attn\.)?rotary_emb\.\w+"),
    table=table,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
)
