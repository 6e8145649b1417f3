"""GPT-2 state dicts <-> our `GPT` parameters, in memory; `transformer.convert` reads and writes
the files.

Name mapping (HF's Conv1D stores weights [in, out] like our kernels, so only reshapes):
  wte.weight [v, d]                  embed/token_embedding (lm_head.weight is the same matrix)
  wpe.weight [max_len, d]            embed/position_embedding
  h.{i}.ln_1.{weight,bias}           decoder/layers_{i}/norm_self_attention/{scale,bias}
  h.{i}.attn.c_attn.weight [d, 3d]   .../self_attention/qkv/kernel [d, 3, n, h]; bias [3, n, h]
  h.{i}.attn.c_proj.weight [d, d]    .../self_attention/out/kernel [n, h, d]
  h.{i}.ln_2.{weight,bias}           .../norm_mlp/{scale,bias}
  h.{i}.mlp.c_fc.weight [d, f]       .../mlp/wi/kernel;  h.{i}.mlp.c_proj.weight [f, d]  .../mlp/wo
  ln_f.{weight,bias}                 decoder/final_norm/{scale,bias}
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from transformer.config import ModelConfig
from transformer.gpt2_config import ConvertError, export_problems, export_vocab_size
from transformer.scan_layers import Params, stack_layers, unstack_layers

# Non-parameter buffers that older checkpoints carry (the causal mask and its fill value).
_BUFFER = re.compile(r"h\.\d+\.(attn|crossattention)\.(bias|masked_bias)")

# HF name (no `transformer.` prefix) -> (our path, HF shape, our shape).
_Layout = dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...]]]


def _layout(cfg: ModelConfig) -> _Layout:
    """Every tensor but wte (whose rows depend on vocabulary padding), with both shapes.

    Each pair of shapes is one row-major reshape: c_attn's 3d outputs are q, k, v, each heads
    major ([3, n, h]), as HF splits them; c_proj's d inputs are the heads concatenated ([n, h]).
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
    layout: _Layout = {
        "wpe.weight": (("embed", "position_embedding"), (cfg.max_len, d), (cfg.max_len, d)),
        "ln_f.weight": (("decoder", "final_norm", "scale"), (d,), (d,)),
        "ln_f.bias": (("decoder", "final_norm", "bias"), (d,), (d,)),
    }
    for i in range(cfg.num_decoder_layers):
        for name, (path, hf_shape, our_shape) in per_layer.items():
            layout[f"h.{i}.{name}"] = (("decoder", f"layers_{i}", *path), hf_shape, our_shape)
    return layout


def _to_numpy(x: Any) -> np.ndarray:
    """float32 NumPy copy of a torch tensor, or float32 view/copy of an array-like."""
    if hasattr(x, "detach"):  # torch: copy, so params never alias a live torch model
        return x.detach().cpu().float().numpy().copy()
    return np.asarray(x, dtype=np.float32)


def _set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for depth, key in enumerate(path):
        if not isinstance(tree, Mapping) or key not in tree:
            raise ConvertError(
                f"params have no {'/'.join(path[: depth + 1])}; expected GPT params for this "
                "model config (nn.meta.unbox(GPT(cfg).init(...)['params']))"
            )
        tree = tree[key]
    return tree


def _normalise_keys(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """GPT2Model names (no `transformer.` prefix) -> tensor, and lm_head.weight (or None)."""
    tensors: dict[str, Any] = {}
    lm_head = None
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            lm_head = value
            continue
        name = key.removeprefix("transformer.")
        if _BUFFER.fullmatch(name):
            continue
        if name in tensors:
            raise ConvertError(f"the state dict has {name} both with and without 'transformer.'")
        tensors[name] = value
    return tensors, lm_head


def params_from_hf_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig) -> Params:
    """Our GPT params (float32 NumPy, nested dicts) from a GPT-2 state dict.

    Keys may carry GPT2LMHeadModel's `transformer.` prefix or be GPT2Model's bare names;
    values are NumPy arrays or torch tensors. Non-parameter buffers (`attn.bias`,
    `attn.masked_bias`) are ignored; `lm_head.weight`, if present, must equal `wte.weight`
    (tied). If `cfg.vocab_size` exceeds wte's rows the extra rows are zeros (padded ids are
    never targets or samples, and the trainer and samplers mask them). The tree is scanned
    (`decoder/layers`) when `cfg.scan_layers`.
    """
    tensors, lm_head = _normalise_keys(state_dict)
    layout = _layout(cfg)
    missing = sorted({"wte.weight", *layout} - set(tensors), key=_natural)
    unexpected = sorted(set(tensors) - {"wte.weight", *layout}, key=_natural)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected)}")
        raise ConvertError(
            "the GPT-2 state dict does not match the config "
            f"({cfg.num_decoder_layers} layers): " + "; ".join(parts)
        )

    wte = _to_numpy(tensors["wte.weight"])
    bad_shapes = []
    if wte.ndim != 2 or wte.shape[1] != cfg.d_model or wte.shape[0] > cfg.vocab_size:
        bad_shapes.append(
            f"wte.weight {wte.shape} (expected [v <= {cfg.vocab_size}, {cfg.d_model}])"
        )
    for name, (_, hf_shape, _) in layout.items():
        shape = tuple(tensors[name].shape)
        if shape != hf_shape:
            bad_shapes.append(f"{name} {shape} (expected {hf_shape})")
    if bad_shapes:
        raise ConvertError("GPT-2 tensors of the wrong shape: " + "; ".join(bad_shapes))
    if lm_head is not None and not np.array_equal(_to_numpy(lm_head), wte):
        raise ConvertError(
            "lm_head.weight differs from transformer.wte.weight; only tied GPT-2 output "
            "embeddings convert to our GPT"
        )

    params: Params = {}
    embedding = np.zeros((cfg.vocab_size, cfg.d_model), np.float32)
    embedding[: wte.shape[0]] = wte
    _set(params, ("embed", "token_embedding"), embedding)
    for name, (path, _, our_shape) in layout.items():
        _set(params, path, _to_numpy(tensors[name]).reshape(our_shape))
    return stack_layers(params) if cfg.scan_layers else params


def hf_state_dict_from_params(
    cfg: ModelConfig, params: Mapping[str, Any], *, vocab_size: int | None = None
) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's state dict (float32 NumPy) from our GPT params, unrolled or scanned.

    Names carry the `transformer.` prefix; the tied `lm_head.weight` is left out, as
    `save_pretrained` does. `vocab_size` drops padded embedding rows.
    """
    problems = export_problems(cfg)
    if problems:
        raise ConvertError("these params are not a GPT-2: " + "; ".join(problems))
    vocab = export_vocab_size(cfg, vocab_size)
    params = _unbox(params)
    decoder = _get(params, ("decoder",))
    if "layers" in decoder:
        params = unstack_layers(params)
    layout = _layout(cfg)
    arrays = len(jax.tree.leaves(params))
    if arrays != len(layout) + 1:  # e.g. more layers than the config has
        raise ConvertError(
            f"params hold {arrays} arrays, but a GPT-2 of this model config has "
            f"{len(layout) + 1}; pass the config the params were built with"
        )
    layout["wte.weight"] = (
        ("embed", "token_embedding"),
        (vocab, cfg.d_model),
        (cfg.vocab_size, cfg.d_model),
    )
    state: dict[str, np.ndarray] = {}
    for name, (path, hf_shape, our_shape) in layout.items():
        value = np.asarray(_get(params, path), dtype=np.float32)
        if value.shape != our_shape:
            raise ConvertError(
                f"{'/'.join(path)} has shape {value.shape}, but the model config needs {our_shape}"
            )
        if name == "wte.weight":
            value = value[:vocab]
        # Contiguous copies: safetensors writes raw buffers, and slices/views are not.
        state[f"transformer.{name}"] = np.ascontiguousarray(value.reshape(hf_shape))
    return state


def _unbox(params: Mapping[str, Any]) -> Any:
    """Strips Flax partitioning boxes and moves arrays to host, so plain params and
    `model.init(...)['params']` both work."""
    import flax.linen as nn

    return jax.device_get(nn.meta.unbox(params))


def _natural(name: str) -> list[Any]:
    """Sort key that puts h.2 before h.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
