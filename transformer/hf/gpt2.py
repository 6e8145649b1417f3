"""GPT-2 (`GPT2LMHeadModel`): its config mapped to our `ModelConfig` and back, and its tensors'
table for the shared engine (`transformer.hf.engine`).

`config_from_hf` refuses GPT-2 variants our GPT would compute differently rather than convert
them silently; `config_to_hf` refuses models that are not a GPT-2. `transformers` (the hf
extra) is imported only when a `GPT2Config` is built.

Tensor names (HF's Conv1D stores weights [in, out] like our kernels, so only reshapes):
  wte.weight [v, d]                  embed/token_embedding (lm_head.weight is the same matrix)
  wpe.weight [max_len, d]            embed/position_embedding
  h.{i}.ln_1.{weight,bias}           decoder/layers_{i}/norm_self_attention/{scale,bias}
  h.{i}.attn.c_attn.weight [d, 3d]   .../self_attention/qkv/kernel [d, 3, n, h]; bias [3, n, h]
  h.{i}.attn.c_proj.weight [d, d]    .../self_attention/out/kernel [n, h, d]
  h.{i}.ln_2.{weight,bias}           .../norm_mlp/{scale,bias}
  h.{i}.mlp.c_fc.weight [d, f]       .../mlp/wi/kernel;  h.{i}.mlp.c_proj.weight [f, d]  .../mlp/wo
  ln_f.{weight,bias}                 decoder/final_norm/{scale,bias}
GPT2LMHeadModel prefixes them with `transformer.`; GPT2Model's bare names load too.
"""

from __future__ import annotations

import re
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


def config_from_hf(hf_config: Any, *, scan_layers: bool = False) -> ModelConfig:
    """Our `ModelConfig` for a GPT-2 config (a `transformers.GPT2Config` or config.json dict).

    GPT-2 variants our GPT cannot compute (other activations, attention scaled by layer index,
    cross-attention, an untied output layer) raise `ConvertError` rather than convert silently
    into a different function. GPT-2 has separate embedding and residual dropout; ours has one
    `dropout_rate`, taken from `resid_pdrop` (inference does not depend on it).
    """
    fields = hf_fields(hf_config)
    check_model_type(FAMILY, fields, "the Hugging Face config")
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


def config_to_hf(
    cfg: ModelConfig,
    *,
    vocab_size: int | None = None,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
) -> Any:
    """The `transformers.GPT2Config` of `cfg`; `vocab_size` drops padded embedding rows.

    BOS/EOS default to GPT-2's <|endoftext|> (50256) when the vocabulary has that id, else
    they stay unset.
    """
    check_exportable(
        cfg,
        FAMILY,
        "this model cannot be exported as GPT-2 (export needs a config like "
        "preset('gpt2_small', ...))",
    )
    vocab = export_vocab_size(cfg, vocab_size)
    eot = _GPT2_EOT if vocab > _GPT2_EOT else None
    bos_token_id = eot if bos_token_id is None else bos_token_id
    eos_token_id = eot if eos_token_id is None else eos_token_id
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
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        architectures=["GPT2LMHeadModel"],
        dtype="float32",  # export writes float32 whatever model.param_dtype is
    )


def table(cfg: ModelConfig) -> Table:
    """Every tensor but wte (whose rows depend on vocabulary padding).

    Each is one row-major reshape: c_attn's 3d outputs are q, k, v, each heads major ([3, n, h]),
    as HF splits them; c_proj's d inputs are the heads concatenated ([n, h]).
    """
    d, n, h, f = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
    per_layer = {
        "ln_1.weight": (("norm_self_attention", "scale"), (d,), (d,)),
        "ln_1.bias": (("norm_self_attention", "bias"), (d,), (d,)),
        "attn.c_attn.weight": (("self_attention", "qkv", "kernel"), (d, 3 * d), (d, 3, n, h)),
        "attn.c_attn.bias": (("self_attention", "qkv", "bias"), (3 * d,), (3, n, h)),
        "attn.c_proj.weight": (("self_attention", "out", "kernel"), (d, d), (n, h, d)),
        "attn.c_proj.bias": (("self_attention", "out", "bias"), (d,), (d,)),
        "ln_2.weight": (("norm_mlp", "scale"), (d,), (d,)),
        "ln_2.bias": (("norm_mlp", "bias"), (d,), (d,)),
        "mlp.c_fc.weight": (("mlp", "wi", "kernel"), (d, f), (d, f)),
        "mlp.c_fc.bias": (("mlp", "wi", "bias"), (f,), (f,)),
        "mlp.c_proj.weight": (("mlp", "wo", "kernel"), (f, d), (f, d)),
        "mlp.c_proj.bias": (("mlp", "wo", "bias"), (d,), (d,)),
    }
    out: Table = {
        "wpe.weight": Tensor((cfg.max_len, d), ("embed", "position_embedding"), (cfg.max_len, d)),
        "ln_f.weight": Tensor((d,), ("decoder", "final_norm", "scale"), (d,)),
        "ln_f.bias": Tensor((d,), ("decoder", "final_norm", "bias"), (d,)),
    }
    for i in range(cfg.num_decoder_layers):
        for name, (path, hf_shape, piece) in per_layer.items():
            out[f"h.{i}.{name}"] = Tensor(hf_shape, ("decoder", f"layers_{i}", *path), piece)
    return out


FAMILY = Family(
    name="gpt2",
    label="GPT-2",
    model_types=("gpt2",),
    classes=("GPT2Config", "GPT2LMHeadModel/GPT2Model"),
    prefix="transformer.",
    embedding="wte.weight",
    # Non-parameter buffers that older checkpoints carry (the causal mask and its fill value).
    buffers=re.compile(r"h\.\d+\.(attn|crossattention)\.(bias|masked_bias)"),
    table=table,
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
)
