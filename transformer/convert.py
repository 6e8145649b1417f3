"""GPT-2 interoperability: Hugging Face `transformers` GPT-2 checkpoints <-> our `GPT` parameters.

    cfg, params = load_hf_gpt2("path/to/gpt2")        # config.json + model.safetensors (or .bin)
    logits = GPT(cfg).apply({"params": params}, tokens)
    export_hf_gpt2(cfg, params, "out/", vocab_size=50257)   # GPT2LMHeadModel.from_pretrained

Name mapping (HF's Conv1D stores weights [in, out] like our kernels, so only reshapes):
  wte.weight [v, d]                  embed/token_embedding (lm_head.weight is the same matrix)
  wpe.weight [max_len, d]            embed/position_embedding
  h.{i}.ln_1.{weight,bias}           decoder/layers_{i}/norm_self_attention/{scale,bias}
  h.{i}.attn.c_attn.weight [d, 3d]   .../self_attention/qkv/kernel [d, 3, n, h]; bias [3, n, h]
  h.{i}.attn.c_proj.weight [d, d]    .../self_attention/out/kernel [n, h, d]
  h.{i}.ln_2.{weight,bias}           .../norm_mlp/{scale,bias}
  h.{i}.mlp.c_fc.weight [d, f]       .../mlp/wi/kernel;  h.{i}.mlp.c_proj.weight [f, d]  .../mlp/wo
  ln_f.{weight,bias}                 decoder/final_norm/{scale,bias}

Importing a directory of safetensors needs only `safetensors`; `.bin` files, in-memory torch
models and export need the hf extra (`pip install -e ".[hf]"`), imported lazily here.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from transformer.config import ConfigError, ModelConfig, preset

Params = dict[str, Any]

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
# Non-parameter buffers that older checkpoints carry (the causal mask and its fill value).
_BUFFER = re.compile(r"h\.\d+\.(attn|crossattention)\.(bias|masked_bias)")


class ConvertError(ValueError):
    """A checkpoint or config cannot be converted; the message names the problem and the fix."""


class MissingDependencyError(ConvertError, ImportError):
    """An optional package (the hf extra) is not installed."""


def _require(module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"GPT-2 conversion needs the '{module.split('.')[0]}' package; "
            'install the hf extra: pip install -e ".[hf]"'
        ) from e


# ---------------------------------------------------------------------------------------------
# Configs.


def _hf_fields(hf_config: Any) -> dict[str, Any]:
    """A GPT2Config (or any object with `to_dict`) or a config.json mapping, as a plain dict."""
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise ConvertError(
        f"expected a transformers GPT2Config or a config.json dict, got {type(hf_config).__name__}"
    )


def _check_model_type(fields: Mapping[str, Any], where: str) -> None:
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
    _check_model_type(fields, "the Hugging Face config")
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


def _export_problems(cfg: ModelConfig) -> list[str]:
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


def _export_vocab_size(cfg: ModelConfig, vocab_size: int | None) -> int:
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
    problems = _export_problems(cfg)
    if problems:
        raise ConvertError(
            "this model cannot be exported as GPT-2: " + "; ".join(problems) + "; export needs "
            "a config like preset('gpt2_small', ...)"
        )
    vocab = _export_vocab_size(cfg, vocab_size)
    eot = _GPT2_EOT if vocab > _GPT2_EOT else None
    transformers = _require("transformers")
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


# ---------------------------------------------------------------------------------------------
# Parameters.

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


def stack_layers(params: Params) -> Params:
    """Unrolled `decoder/layers_{i}` -> scanned `decoder/layers` with a leading layer axis."""
    decoder = dict(params["decoder"])
    count = sum(1 for k in decoder if re.fullmatch(r"layers_\d+", k))
    layers = [decoder.pop(f"layers_{i}") for i in range(count)]
    decoder["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return {**params, "decoder": decoder}


def unstack_layers(params: Params) -> Params:
    """Scanned `decoder/layers` (leading layer axis) -> unrolled `decoder/layers_{i}`."""
    decoder = dict(params["decoder"])
    stacked = decoder.pop("layers")
    for i in range(jax.tree.leaves(stacked)[0].shape[0]):
        decoder[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "decoder": decoder}


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
    problems = _export_problems(cfg)
    if problems:
        raise ConvertError("these params are not a GPT-2: " + "; ".join(problems))
    vocab = _export_vocab_size(cfg, vocab_size)
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


# ---------------------------------------------------------------------------------------------
# Files and models.

_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _read_safetensors(path: Path) -> dict[str, Any]:
    numpy_reader = _require("safetensors.numpy")
    try:
        return numpy_reader.load_file(str(path))
    except TypeError:  # bfloat16 and float8 have no NumPy dtype; torch reads them
        _require("torch")
        return _require("safetensors.torch").load_file(str(path))


def _read_bin(path: Path) -> dict[str, Any]:
    torch = _require("torch")
    # weights_only: a .bin is a pickle, and unpickling arbitrary objects can run code.
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _read_weights(directory: Path) -> dict[str, Any]:
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
        f"{directory} has no GPT-2 weights: expected one of {', '.join(_WEIGHT_FILES)}, "
        f"found {present}"
    )


def _read_directory(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not directory.is_dir():
        raise ConvertError(f"{directory} is not a directory; pass a Hugging Face GPT-2 directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{directory} has no config.json; is it a Hugging Face model directory?")
    fields = json.loads(config_path.read_text())
    _check_model_type(fields, str(config_path))  # before reading gigabytes of weights
    return fields, _read_weights(directory)


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
    if isinstance(source, (str, os.PathLike)):
        if hf_config is not None:
            raise ConvertError("a directory brings its own config.json; do not pass hf_config")
        hf_config, state_dict = _read_directory(Path(source))
    elif isinstance(source, Mapping):
        if hf_config is None:
            raise ConvertError("a state dict needs its hf_config (GPT2Config or config.json dict)")
        state_dict = source
    elif hasattr(source, "state_dict") and hasattr(source, "config"):  # a torch GPT-2 model
        if hf_config is None:
            hf_config = source.config
        state_dict = source.state_dict()
    else:
        raise ConvertError(
            f"cannot load GPT-2 from a {type(source).__name__}; pass a directory, a "
            "GPT2LMHeadModel/GPT2Model, or a state dict with its config"
        )
    cfg = config_from_hf(hf_config, scan_layers=scan_layers)
    if pad_vocab_to is not None:
        if pad_vocab_to < cfg.vocab_size:
            raise ConvertError(
                f"pad_vocab_to={pad_vocab_to} is smaller than the checkpoint's vocabulary "
                f"({cfg.vocab_size}); padding cannot drop rows"
            )
        cfg = dataclasses.replace(cfg, vocab_size=pad_vocab_to)
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
    safetensors_numpy = _require("safetensors.numpy")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(str(out))
    # transformers refuses safetensors files whose metadata does not name their format.
    safetensors_numpy.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
