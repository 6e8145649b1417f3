"""Llama state dicts <-> our `GPT` parameters, in memory; `transformer.convert` reads and writes
the files.

Name mapping (HF's nn.Linear weights are [out, in]; our kernels are [in, out], so every kernel
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

import jax
import numpy as np

from transformer.config import ModelConfig
from transformer.gpt2_config import ConvertError, export_vocab_size
from transformer.gpt2_params import _get, _natural, _set, _to_numpy, _unbox
from transformer.llama_config import llama_export_problems
from transformer.scan_layers import Params, stack_layers, unstack_layers

# Rotary buffers, recomputed from the config: `rotary_emb.inv_freq` (per layer in old files).
_BUFFER = re.compile(r"(layers\.\d+\.self_attn\.)?rotary_emb\.\w+")

# HF name (no `model.` prefix) -> (HF shape, our path, slot on our axis 1 or None, piece shape).
# Our piece is `hf.T.reshape(piece shape)`; a slot stacks q, k, v (or k, v) into one kernel.
_Layout = dict[str, tuple[tuple[int, ...], tuple[str, ...], int | None, tuple[int, ...]]]


def _layout(cfg: ModelConfig) -> _Layout:
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
    layout: _Layout = {"norm.weight": ((d,), ("decoder", "final_norm", "scale"), None, (d,))}
    for i in range(cfg.num_decoder_layers):
        for name, (hf_shape, path, slot, piece) in per_layer.items():
            path = ("decoder", f"layers_{i}", *path)
            layout[f"layers.{i}.{name}"] = (hf_shape, path, slot, piece)
    return layout


def _our_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our path -> our shape, for every array of the params (stacked kernels whole)."""
    shapes = {("embed", "token_embedding"): (cfg.vocab_size, cfg.d_model)}
    if not cfg.tie_embeddings:
        shapes[("lm_head", "kernel")] = (cfg.d_model, cfg.vocab_size)
    slots: dict[tuple[str, ...], int] = {}
    for _, path, slot, piece in _layout(cfg).values():
        shapes[path] = piece
        if slot is not None:
            slots[path] = slots.get(path, 0) + 1
    for path, count in slots.items():
        shapes[path] = (shapes[path][0], count, *shapes[path][1:])
    return shapes


def _normalise_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """LlamaModel names (no `model.` prefix; lm_head.weight kept) -> tensor, buffers dropped."""
    tensors: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("model.")
        if _BUFFER.fullmatch(name):
            continue
        if name in tensors:
            raise ConvertError(f"the state dict has {name} both with and without 'model.'")
        tensors[name] = value
    return tensors


def params_from_hf_llama_state_dict(state_dict: Mapping[str, Any], cfg: ModelConfig) -> Params:
    """Our GPT params (float32 NumPy, nested dicts) from a Llama state dict.

    Keys may carry LlamaForCausalLM's `model.` prefix or be LlamaModel's bare names; values are
    NumPy arrays or torch tensors; `rotary_emb.inv_freq` buffers are ignored. Tied configs need
    no `lm_head.weight` (if present it must equal the embedding); untied ones need it. If
    `cfg.vocab_size` exceeds the embedding's rows, the extra rows (and lm_head columns) are
    zeros: padded ids are never targets or samples. The tree is scanned when `cfg.scan_layers`.
    """
    tensors = _normalise_keys(state_dict)
    layout = _layout(cfg)
    names = {"embed_tokens.weight", *layout}
    if not cfg.tie_embeddings:
        names.add("lm_head.weight")
    missing = sorted(names - set(tensors), key=_natural)
    unexpected = sorted(set(tensors) - names - {"lm_head.weight"}, key=_natural)
    if missing or unexpected:
        parts = []
        if missing:
            untied = " (an untied config needs LlamaForCausalLM's lm_head)"
            parts.append(
                f"missing tensors: {', '.join(missing)}"
                + (untied if "lm_head.weight" in missing else "")
            )
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected)}")
        raise ConvertError(
            "the Llama state dict does not match the config "
            f"({cfg.num_decoder_layers} layers): " + "; ".join(parts)
        )

    embed = _to_numpy(tensors["embed_tokens.weight"])
    rows, d = embed.shape if embed.ndim == 2 else (0, 0)
    bad_shapes = []
    if embed.ndim != 2 or d != cfg.d_model or rows > cfg.vocab_size:
        bad_shapes.append(
            f"embed_tokens.weight {embed.shape} (expected [v <= {cfg.vocab_size}, {cfg.d_model}])"
        )
    head = tensors.get("lm_head.weight")
    if head is not None and tuple(head.shape) != embed.shape:
        bad_shapes.append(f"lm_head.weight {tuple(head.shape)} (expected {embed.shape})")
    for name, (hf_shape, *_) in layout.items():
        if tuple(tensors[name].shape) != hf_shape:
            bad_shapes.append(f"{name} {tuple(tensors[name].shape)} (expected {hf_shape})")
    if bad_shapes:
        raise ConvertError("Llama tensors of the wrong shape: " + "; ".join(bad_shapes))

    params: Params = {}
    embedding = np.zeros((cfg.vocab_size, cfg.d_model), np.float32)
    embedding[:rows] = embed
    _set(params, ("embed", "token_embedding"), embedding)
    if cfg.tie_embeddings:
        if head is not None and not np.array_equal(_to_numpy(head), embed):
            raise ConvertError(
                "lm_head.weight differs from model.embed_tokens.weight, but the config ties "
                "them (tie_word_embeddings=True); fix the config or the checkpoint"
            )
    else:
        kernel = np.zeros((cfg.d_model, cfg.vocab_size), np.float32)
        kernel[:, :rows] = _to_numpy(head).T
        _set(params, ("lm_head", "kernel"), kernel)
    stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for name, (_, path, slot, piece) in layout.items():
        value = _to_numpy(tensors[name]).T.reshape(piece)
        if slot is None:
            _set(params, path, np.ascontiguousarray(value))
        else:
            stacked.setdefault(path, {})[slot] = value
    for path, pieces in stacked.items():
        _set(params, path, np.stack([pieces[s] for s in sorted(pieces)], axis=1))
    return stack_layers(params) if cfg.scan_layers else params


def hf_llama_state_dict_from_params(
    cfg: ModelConfig, params: Mapping[str, Any], *, vocab_size: int | None = None
) -> dict[str, np.ndarray]:
    """LlamaForCausalLM's state dict (float32 NumPy) from our GPT params, unrolled or scanned.

    Names carry the `model.` prefix; `lm_head.weight` is there only when untied (a tied one is
    left out, as `save_pretrained` does). `vocab_size` drops padded embedding rows.
    """
    problems = llama_export_problems(cfg)
    if problems:
        raise ConvertError("these params are not a Llama: " + "; ".join(problems))
    vocab = export_vocab_size(cfg, vocab_size)
    params = _unbox(params)
    if "layers" in _get(params, ("decoder",)):
        params = unstack_layers(params)
    shapes = _our_shapes(cfg)
    found = {
        tuple(str(getattr(key, "key", key)) for key in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    missing, unexpected = (
        sorted(paths, key=_natural_path) for paths in (set(shapes) - found, found - set(shapes))
    )
    if missing or unexpected:  # e.g. more layers than the config has, or an untied lm_head
        parts = [
            f"{what} {_listed(paths)}"
            for what, paths in (("missing", missing), ("unexpected", unexpected))
            if paths
        ]
        raise ConvertError(
            f"params hold {len(found)} arrays, but a Llama of this model config has "
            f"{len(shapes)} ({'; '.join(parts)}); pass the config the params were built with"
        )
    ours: dict[tuple[str, ...], np.ndarray] = {}
    for path, shape in shapes.items():
        ours[path] = np.asarray(_get(params, path), dtype=np.float32)
        if ours[path].shape != shape:
            raise ConvertError(
                f"{'/'.join(path)} has shape {ours[path].shape}, but the model config needs {shape}"
            )
    # Contiguous copies: safetensors writes raw buffers, and transposes are views.
    state = {"model.embed_tokens.weight": ours[("embed", "token_embedding")][:vocab]}
    for name, (hf_shape, path, slot, _) in _layout(cfg).items():
        piece = ours[path] if slot is None else ours[path][:, slot]
        state[f"model.{name}"] = piece.reshape(hf_shape[::-1]).T
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = ours[("lm_head", "kernel")][:, :vocab].T
    return {name: np.ascontiguousarray(value) for name, value in state.items()}


def _natural_path(path: tuple[str, ...]) -> list[Any]:
    return _natural("/".join(path))


def _listed(paths: list[tuple[str, ...]], most: int = 4) -> str:
    names = ", ".join("/".join(path) for path in paths[:most])
    return names + (f" and {len(paths) - most} more" if len(paths) > most else "")
