"""LoRA (Hu et al. 2021): low-rank adapters beside frozen projections, y = x W + (alpha / r) x A B.

`model.lora_rank` r > 0 gives each projection named in `model.lora_targets` two parameters next
to its kernel W [*in, *out]: `lora_a` [*in, r] (uniform in +-1/sqrt(fan_in), as PEFT's
Kaiming start) and `lora_b` [r, *out] (zeros, so training starts from the base model exactly).
Only the adapters train (`split_trainable`); the base may be stored in bfloat16.

Targets, by the projection they adapt (our module names in brackets):
  q, k, v   queries, keys, values: slots of the fused `qkv` [d, 3, n, h] (or `query` and slots
            of `key_value` [d, 2, k, h] with grouped-query attention); each slot its own A and B
  qkv       the whole fused projection with one A and B (GPT-2's `c_attn`)
  o         the attention output `out`
  gate, up  the FFN's `wi_gate` and `wi_up` (SwiGLU), `up` also GPT-2's `wi` (`c_fc`)
  down      the FFN's `wo`

With slots the adapters are `lora_a` [*in, S, r] and `lora_b` [S, r, *rest]: S of the fused
kernel's slots get x A_s B_s, the others nothing. `merge` folds the adapters into the kernels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from transformer.model.config import ModelConfig
from transformer.model.scan import stack_layers, unstack_layers

Array = jax.Array

ADAPTER_NAMES = ("lora_a", "lora_b")  # parameter names: they are the trainable ones
# Our projection module -> {target: slot of its first output axis (None: the whole output)}.
MODULES: dict[str, dict[str, int | None]] = {
    "qkv": {"q": 0, "k": 1, "v": 2, "qkv": None},
    "query": {"q": None, "qkv": None},
    "key_value": {"k": 0, "v": 1, "qkv": None},
    "out": {"o": None},
    "wi": {"up": None},
    "wi_gate": {"gate": None},
    "wi_up": {"up": None},
    "wo": {"down": None},
}


@dataclasses.dataclass(frozen=True)
class Lora:
    """The adapters of one projection."""

    rank: int
    scale: float  # alpha / rank
    dropout: float  # on the adapters' input, in training
    slots: tuple[int, ...] | None  # adapted slots of the first output axis; None: the whole


def targets(cfg: ModelConfig) -> tuple[str, ...]:
    """`model.lora_targets` as a tuple of target names (empty without LoRA)."""
    if not cfg.lora_rank:
        return ()
    return tuple(t.strip() for t in cfg.lora_targets.split(",") if t.strip())


def lora_for(cfg: ModelConfig, module: str) -> Lora | None:
    """The adapters `cfg` puts on the projection named `module`, or None."""
    chosen = [t for t in targets(cfg) if t in MODULES.get(module, {})]
    if not chosen:
        return None
    slots = [MODULES[module][t] for t in chosen]
    whole = any(s is None for s in slots)
    return Lora(
        rank=cfg.lora_rank,
        scale=cfg.lora_alpha / cfg.lora_rank,
        dropout=cfg.lora_dropout,
        slots=None if whole else tuple(sorted(slots)),
    )


def init_a(fan_in: int) -> Any:
    """A's start: uniform in +-1/sqrt(fan_in) (PEFT's kaiming_uniform_(a=sqrt(5)))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def delta(a: Array, b: Array, kernel_shape: tuple[int, ...], n_in: int, lora: Lora) -> Array:
    """(alpha / r) A B laid out like the kernel [*in, *out], float32."""
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    fan_in = int(np.prod(kernel_shape[:n_in]))
    if lora.slots is None:
        product = a32.reshape(fan_in, lora.rank) @ b32.reshape(lora.rank, -1)
        return lora.scale * product.reshape(kernel_shape)
    out = np.zeros(kernel_shape, np.float32)  # [*in, S_total, *rest]: unadapted slots stay 0
    out = jnp.asarray(out).reshape(fan_in, kernel_shape[n_in], -1)
    a32 = a32.reshape(fan_in, len(lora.slots), lora.rank)
    b32 = b32.reshape(len(lora.slots), lora.rank, -1)
    products = jnp.einsum("isr,sro->iso", a32, b32)
    out = out.at[:, list(lora.slots)].set(products)
    return lora.scale * out.reshape(kernel_shape)


def is_adapter(path: tuple[Any, ...]) -> bool:
    """Whether a parameter path (keys or key entries) names an adapter."""
    last = path[-1]
    return getattr(last, "key", last) in ADAPTER_NAMES


def split_trainable(params: Any) -> tuple[Any, Any]:
    """(trainable, frozen) parts of a parameter tree: with adapters, only they train; without,
    every parameter does. Both keep the tree's nesting with only their own leaves."""
    flat = traverse_util.flatten_dict(params)
    if not any(is_adapter(path) for path in flat):
        return params, {}
    trainable = {p: v for p, v in flat.items() if is_adapter(p)}
    frozen = {p: v for p, v in flat.items() if not is_adapter(p)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def join(trainable: Any, frozen: Any) -> Any:
    """The whole tree again from `split_trainable`'s two parts."""
    if not frozen:
        return trainable
    flat = {**traverse_util.flatten_dict(frozen), **traverse_util.flatten_dict(trainable)}
    return traverse_util.unflatten_dict(flat)


def merge(cfg: ModelConfig, params: Any) -> tuple[ModelConfig, Any]:
    """(the config without LoRA, the parameters with every adapter folded into its kernel,
    W + (alpha / r) A B, in the kernel's dtype): the same function as a plain model."""
    if not cfg.lora_rank:
        return cfg, params
    stacked = "layers" in params.get("decoder", {})
    tree = unstack_layers(params) if stacked else params
    merged = _merge_node(cfg, tree, name="")
    plain = dataclasses.replace(cfg, lora_rank=0)
    return plain, (stack_layers(merged) if stacked else merged)


def _merge_node(cfg: ModelConfig, node: Any, name: str) -> Any:
    if not isinstance(node, dict):
        return node
    if "lora_a" not in node:
        return {key: _merge_node(cfg, value, key) for key, value in node.items()}
    lora = lora_for(cfg, name)
    kernel, a, b = node["kernel"], node["lora_a"], node["lora_b"]
    n_in = a.ndim - 1 - (0 if lora.slots is None else 1)
    merged = kernel.astype(jnp.float32) + delta(a, b, kernel.shape, n_in, lora)
    rest = {k: v for k, v in node.items() if k not in ADAPTER_NAMES}
    return {**rest, "kernel": np.asarray(merged).astype(np.asarray(kernel).dtype)}
