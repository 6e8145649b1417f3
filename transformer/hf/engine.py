"""The mapping engine both Hugging Face families share. A family is a `Family` (its config
mapping and a table of tensors); this module checks names and shapes and turns state dicts into
our parameters and back by that table (`transformer.hf.files` reads and writes directories).

A table entry says, for one Hugging Face tensor: its shape, our parameter's path, whether HF
stores it transposed (torch's `nn.Linear` keeps [out, in]; GPT-2's `Conv1D` keeps [in, out] as
our kernels do), our piece's shape (one row-major reshape), and a slot when several HF tensors
stack into one of our kernels along axis 1 (q, k, v into the fused `qkv` [d, 3, n, h]).
The token embedding and the output layer are handled here too, since their rows depend on
vocabulary padding: extra rows are zeros (padded ids are never targets or samples) and export
drops them again.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from transformer.errors import ConvertError
from transformer.model.config import ModelConfig, family_problems
from transformer.model.lora import lora_for
from transformer.model.scan import Params, stack_layers, unstack_layers


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One Hugging Face tensor of a family's table (see the module docstring)."""

    hf_shape: tuple[int, ...]
    path: tuple[str, ...]  # our parameter, e.g. ('decoder', 'layers_0', 'mlp', 'wi', 'kernel')
    piece: tuple[int, ...]  # our shape of this tensor (within the slot, if any)
    transposed: bool = False  # HF keeps it [out, in]
    slot: int | None = None  # index on our kernel's axis 1 where several HF tensors stack


Table = dict[str, Tensor]  # HF name without the model prefix -> entry


@dataclasses.dataclass(frozen=True)
class Family:
    """What tells one Hugging Face family from another; `transformer.hf.gpt2` and
    `transformer.hf.llama` each define one."""

    name: str  # our family key in `model.config.FAMILIES`: 'gpt2' | 'llama'
    label: str  # for messages: 'GPT-2' | 'Llama'
    model_types: tuple[str, ...]  # config.json's model_type values
    classes: tuple[str, str]  # (config class, model classes), for messages
    prefix: str  # of every tensor but lm_head in the *ForCausalLM state dict
    embedding: str  # the token embedding's name, without the prefix
    buffers: re.Pattern[str]  # non-parameters some checkpoints carry (masks, rotary tables)
    table: Callable[[ModelConfig], Table]  # every tensor but the embedding and lm_head
    config_from_hf: Callable[..., ModelConfig]
    config_to_hf: Callable[..., Any]


# ---------------------------------------------------------------------------------------------
# Small tools.


def hf_fields(hf_config: Any) -> dict[str, Any]:
    """A transformers config (anything with `to_dict`) or a config.json mapping, as a dict."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ConvertError(
        f"expected a transformers config (GPT2Config, LlamaConfig) or a config.json dict, got "
        f"{type(hf_config).__name__}"
    )


def check_model_type(family: Family, fields: Mapping[str, Any], where: str) -> None:
    model_type = fields.get("model_type")
    if model_type not in family.model_types:
        kinds = " and ".join(repr(t) for t in family.model_types)
        raise ConvertError(
            f"{where} has model_type={model_type!r}; only {kinds} ({family.classes[1]}) "
            f"checkpoints convert as {family.label}"
        )


def to_numpy(x: Any) -> np.ndarray:
    """float32 NumPy copy of a torch tensor, or float32 view/copy of an array-like."""
    if hasattr(x, "detach"):  # torch: copy, so params never alias a live torch model
        return x.detach().cpu().float().numpy().copy()
    return np.asarray(x, dtype=np.float32)


def tree_set(tree: Params, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def tree_get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for depth, key in enumerate(path):
        if not isinstance(tree, Mapping) or key not in tree:
            raise ConvertError(
                f"params have no {'/'.join(path[: depth + 1])}; expected GPT params for this "
                "model config (nn.meta.unbox(GPT(cfg).init(...)['params']))"
            )
        tree = tree[key]
    return tree


def natural(name: str) -> list[Any]:
    """Sort key that puts h.2 before h.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def unbox(params: Mapping[str, Any]) -> Any:
    """Strips Flax partitioning boxes and moves arrays to the host, so plain params and
    `model.init(...)['params']` both work."""
    return jax.device_get(nn.meta.unbox(params))


def export_vocab_size(cfg: ModelConfig, vocab_size: int | None) -> int:
    if vocab_size is None:
        return cfg.vocab_size
    if not 0 < vocab_size <= cfg.vocab_size:
        raise ConvertError(
            f"vocab_size={vocab_size} must be in [1, model.vocab_size={cfg.vocab_size}]: export "
            "can only drop padded embedding rows"
        )
    return vocab_size


def pad_vocab(cfg: ModelConfig, pad_vocab_to: int | None) -> ModelConfig:
    """`cfg` with `pad_vocab_to` embedding rows; the checkpoint's own rows stay the real ones."""
    if pad_vocab_to is None:
        return cfg
    if pad_vocab_to < cfg.vocab_size:
        raise ConvertError(
            f"pad_vocab_to={pad_vocab_to} is smaller than the checkpoint's vocabulary "
            f"({cfg.vocab_size}); padding cannot drop rows"
        )
    return dataclasses.replace(cfg, vocab_size=pad_vocab_to, real_vocab_size=cfg.num_classes)


def check_exportable(cfg: ModelConfig, family: Family, what: str) -> None:
    """ConvertError naming every field that stops `cfg` from being a `family` model."""
    problems = family_problems(cfg, family.name)
    if problems:
        raise ConvertError(f"{what}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# State dicts <-> parameters, by a family's table.


def _normalise(family: Family, state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """Names without the model prefix -> tensor (buffers dropped), and lm_head.weight (or None)."""
    tensors: dict[str, Any] = {}
    lm_head = None
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            lm_head = value
            continue
        name = key.removeprefix(family.prefix)
        if family.buffers.fullmatch(name):
            continue
        if name in tensors:
            raise ConvertError(f"the state dict has {name} both with and without '{family.prefix}'")
        tensors[name] = value
    return tensors, lm_head


def _check_names(
    family: Family, cfg: ModelConfig, tensors: Mapping[str, Any], table: Table, lm_head: Any
) -> None:
    names = {family.embedding, *table}
    missing = sorted(names - set(tensors), key=natural)
    if not cfg.tie_embeddings and lm_head is None:
        missing.append("lm_head.weight")
    unexpected = sorted(set(tensors) - names, key=natural)
    if not (missing or unexpected):
        return
    parts = []
    if missing:
        untied = " (an untied config needs the *ForCausalLM lm_head)"
        parts.append(
            f"missing tensors: {', '.join(missing)}"
            + (untied if "lm_head.weight" in missing else "")
        )
    if unexpected:
        parts.append(f"unexpected tensors: {', '.join(unexpected)}")
    raise ConvertError(
        f"the {family.label} state dict does not match the config "
        f"({cfg.num_decoder_layers} layers): " + "; ".join(parts)
    )


def _check_shapes(
    family: Family,
    cfg: ModelConfig,
    embed: np.ndarray,
    lm_head: Any,
    tensors: Mapping,
    table: Table,
) -> None:
    bad = []
    if embed.ndim != 2 or embed.shape[1] != cfg.d_model or embed.shape[0] > cfg.vocab_size:
        bad.append(
            f"{family.embedding} {embed.shape} (expected [v <= {cfg.vocab_size}, {cfg.d_model}])"
        )
    if lm_head is not None and tuple(lm_head.shape) != embed.shape:
        bad.append(f"lm_head.weight {tuple(lm_head.shape)} (expected {embed.shape})")
    for name, entry in table.items():
        shape = tuple(tensors[name].shape)
        if shape != entry.hf_shape:
            bad.append(f"{name} {shape} (expected {entry.hf_shape})")
    if bad:
        raise ConvertError(f"{family.label} tensors of the wrong shape: " + "; ".join(bad))


def params_from_state_dict(
    family: Family, state_dict: Mapping[str, Any], cfg: ModelConfig
) -> Params:
    """Our GPT params (float32 NumPy, nested dicts) from a `family` state dict.

    Keys may carry the *ForCausalLM prefix or be the bare model's names; values are NumPy
    arrays or torch tensors; non-parameter buffers are ignored. A tied config needs no
    `lm_head.weight` (if present it must equal the embedding); an untied one needs it. Rows
    past the checkpoint's vocabulary (`cfg.vocab_size` larger) are zeros. The tree is scanned
    (`decoder/layers`) when `cfg.scan_layers`.
    """
    tensors, lm_head = _normalise(family, state_dict)
    table = family.table(cfg)
    _check_names(family, cfg, tensors, table, lm_head)
    embed = to_numpy(tensors[family.embedding])
    _check_shapes(family, cfg, embed, lm_head, tensors, table)

    params: Params = {}
    rows = embed.shape[0]
    embedding = np.zeros((cfg.vocab_size, cfg.d_model), np.float32)
    embedding[:rows] = embed
    tree_set(params, ("embed", "token_embedding"), embedding)
    if cfg.tie_embeddings:
        if lm_head is not None and not np.array_equal(to_numpy(lm_head), embed):
            raise ConvertError(
                f"lm_head.weight differs from {family.prefix}{family.embedding}, but the config "
                "ties them; only a tied output layer converts to a tied config (fix the config "
                "or the checkpoint)"
            )
    else:
        kernel = np.zeros((cfg.d_model, cfg.vocab_size), np.float32)
        kernel[:, :rows] = to_numpy(lm_head).T
        tree_set(params, ("lm_head", "kernel"), kernel)
    stacked: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for name, entry in table.items():
        value = to_numpy(tensors[name])
        value = (value.T if entry.transposed else value).reshape(entry.piece)
        if entry.slot is None:
            tree_set(params, entry.path, np.ascontiguousarray(value))
        else:
            stacked.setdefault(entry.path, {})[entry.slot] = value
    for path, pieces in stacked.items():
        tree_set(params, path, np.stack([pieces[s] for s in sorted(pieces)], axis=1))
    return stack_layers(params) if cfg.scan_layers else params


def our_shapes(cfg: ModelConfig, table: Table) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our path -> our shape, for every array of the params (stacked kernels whole)."""
    shapes = {("embed", "token_embedding"): (cfg.vocab_size, cfg.d_model)}
    if not cfg.tie_embeddings:
        shapes[("lm_head", "kernel")] = (cfg.d_model, cfg.vocab_size)
    slots: dict[tuple[str, ...], int] = {}
    for entry in table.values():
        shapes[entry.path] = entry.piece
        if entry.slot is not None:
            slots[entry.path] = slots.get(entry.path, 0) + 1
    for path, count in slots.items():
        shapes[path] = (shapes[path][0], count, *shapes[path][1:])
    return shapes


def _listed(paths: list[tuple[str, ...]], most: int = 4) -> str:
    names = ", ".join("/".join(path) for path in paths[:most])
    return names + (f" and {len(paths) - most} more" if len(paths) > most else "")


def _our_arrays(cfg: ModelConfig, params: Mapping[str, Any], table: Table) -> dict:
    """Our path -> float32 array for every parameter the table and embeddings name, after
    checking that the params hold exactly those arrays with those shapes."""
    params = unbox(params)
    if "layers" in tree_get(params, ("decoder",)):
        params = unstack_layers(params)
    shapes = our_shapes(cfg, table)
    found = {
        tuple(str(getattr(key, "key", key)) for key in path)
        for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    missing, unexpected = (
        sorted(paths, key=lambda p: natural("/".join(p)))
        for paths in (set(shapes) - found, found - set(shapes))
    )
    if missing or unexpected:  # e.g. more layers than the config has, or an untied lm_head
        parts = [
            f"{what} {_listed(paths)}"
            for what, paths in (("missing", missing), ("unexpected", unexpected))
            if paths
        ]
        raise ConvertError(
            f"params hold {len(found)} arrays, but a model of this config has "
            f"{len(shapes)} ({'; '.join(parts)}); pass the config the params were built with"
        )
    arrays = {}
    for path, shape in shapes.items():
        arrays[path] = np.asarray(tree_get(params, path), dtype=np.float32)
        if arrays[path].shape != shape:
            raise ConvertError(
                f"{'/'.join(path)} has shape {arrays[path].shape}, but the model config needs "
                f"{shape}"
            )
    return arrays


def state_dict_from_params(
    family: Family, cfg: ModelConfig, params: Mapping[str, Any], vocab_size: int | None = None
) -> dict[str, np.ndarray]:
    """The *ForCausalLM state dict (float32 NumPy) of our GPT params, unrolled or scanned: names
    with the prefix, `lm_head.weight` only when untied (as `save_pretrained` leaves a tied one
    out), padded embedding rows dropped down to `vocab_size`."""
    check_exportable(cfg, family, f"these params are not a {family.label}")
    vocab = export_vocab_size(cfg, vocab_size)
    table = family.table(cfg)
    ours = _our_arrays(cfg, params, table)
    state = {family.prefix + family.embedding: ours[("embed", "token_embedding")][:vocab]}
    for name, entry in table.items():
        piece = ours[entry.path] if entry.slot is None else ours[entry.path][:, entry.slot]
        hf_order = entry.hf_shape[::-1] if entry.transposed else entry.hf_shape
        piece = piece.reshape(hf_order)
        state[family.prefix + name] = piece.T if entry.transposed else piece
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = ours[("lm_head", "kernel")][:, :vocab].T
    # Contiguous copies: safetensors writes raw buffers, and slices and transposes are views.
    return {name: np.ascontiguousarray(value) for name, value in state.items()}


def adapter_tensors(
    family: Family, cfg: ModelConfig, params: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT's LoRA tensors of our adapters (`lora_A.weight` [r, in], `lora_B.weight` [out, r],
    named as `PeftModel` saves them) and the full names of the modules they adapt (GPT-2 names
    two modules of a layer `c_proj`: full names keep an adapter off the other), by the family's
    table.

    A fused kernel with one adapter over all its slots (target `qkv`) becomes one adapter per
    Hugging Face module with the same A; per-slot adapters on a module Hugging Face keeps fused
    (GPT-2's c_attn) cannot be one PEFT adapter and are refused."""
    params = unbox(params)
    if "layers" in tree_get(params, ("decoder",)):
        params = unstack_layers(params)
    tensors: dict[str, np.ndarray] = {}
    modules: set[str] = set()
    for hf_name, entry in family.table(cfg).items():
        node = tree_get(params, entry.path[:-1])
        if not hf_name.endswith(".weight") or "lora_a" not in node:
            continue
        pair = _adapter_pair(cfg, entry, node, hf_name)
        if pair is None:
            continue
        module = family.prefix + hf_name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = pair[0]
        tensors[f"base_model.model.{module}.lora_B.weight"] = pair[1]
        modules.add(module)
    return tensors, sorted(modules)


def _adapter_pair(
    cfg: ModelConfig, entry: Tensor, node: Mapping[str, Any], hf_name: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """(lora_A [r, in], lora_B [out, r]) of the Hugging Face module behind `entry`, or None
    when its slot of a fused kernel has no adapter."""
    spec = lora_for(cfg, entry.path[-2])
    a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
    r = spec.rank
    if spec.slots is None:
        fan_in = a.size // r
        a_in = a.reshape(fan_in, r)
        b_out = b.reshape(r, -1) if entry.slot is None else b.reshape(r, b.shape[1], -1)
        b_out = b_out if entry.slot is None else b_out[:, entry.slot]
    elif entry.slot is None:
        raise ConvertError(
            f"{hf_name} holds queries, keys and values in one module: a PEFT adapter for it "
            "needs one adapter over all three (model.lora_targets with qkv, not q, k, v); "
            "export merged weights instead (without --adapter)"
        )
    elif entry.slot not in spec.slots:
        return None
    else:
        index, slots = spec.slots.index(entry.slot), len(spec.slots)
        a_in = a.reshape(-1, slots, r)[:, index]
        b_out = b.reshape(slots, r, -1)[index]
    return np.ascontiguousarray(a_in.T), np.ascontiguousarray(b_out.T)
