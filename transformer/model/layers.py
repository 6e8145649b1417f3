"""The Transformer's sublayers, shared by the encoder-decoder and GPT ("Attention Is All You Need"):
projections, feed-forward network, norms and masks (attention is `transformer.model.attention`,
the residual blocks and stacks `transformer.model.blocks`).

Shape legend used in comments throughout the package:
  b batch, t query length, s key length, n heads, k key/value heads (n with multi-head
  attention, fewer with grouped-query attention), h head dim (d_k = d_v), d model width,
  f feed-forward hidden width, v vocabulary, l layers.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`,
`layers`);
activations are constrained under names of their own (`activation_batch`, `activation_embed`,
...) at block and embedding outputs, on the attention projections and on the FFN hidden units.
`transformer.model.sharding` maps both onto a device mesh with one small rules table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer.model import lora as lora_module
from transformer.model import ops
from transformer.model.config import ModelConfig
from transformer.model.lora import Lora

Array = jax.Array
Initializer = Callable[..., Array]


# Logical names of activation axes (`transformer.sharding` maps them), by shape: the residual
# stream [b, t, d], queries [b, t, n, h], fused projections [b, t, 3, n, h] (keys and values
# [b, s, 2, n, h]) and FFN hidden units [b, t, f].
RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")
HEADS_AXES = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
QKV_AXES = ("activation_batch", "activation_length", None, "activation_heads", "activation_kv")
HIDDEN_AXES = ("activation_batch", "activation_length", "activation_mlp")


def with_axes(init: Initializer, *axes: str | None) -> Initializer:
    """Attaches logical axis names to a parameter initialiser."""
    return nn.with_logical_partitioning(init, axes)


def kernel_init(cfg: ModelConfig, fan_in: int, fan_out: int, scale: float = 1.0) -> Initializer:
    """Xavier-uniform over one [fan_in, fan_out] projection (as the paper's reference code) or
    GPT-2's N(0, 0.02 * scale). Fans are explicit because fused kernels (QKV) hold several
    projections."""
    if cfg.init_std > 0:
        return nn.initializers.normal(cfg.init_std * scale)
    limit = np.sqrt(6.0 / (fan_in + fan_out))

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -limit, limit)

    return init


# ---------------------------------------------------------------------------------------------
# Masks: boolean, True where a query may attend to a key, shape [b, 1, t, s] (broadcast over n).


def causal_mask(length: int) -> Array:
    """Lower-triangular mask: position i sees positions <= i (sec. 3.2.3)."""
    return jnp.tril(jnp.ones((1, 1, length, length), dtype=bool))


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
    """Queries see keys of their own segment; segment 0 is padding and is never seen."""
    same = query_segments[:, None, :, None] == key_segments[:, None, None, :]
    return same & (key_segments[:, None, None, :] > 0)  # [b, 1, t, s]


# ---------------------------------------------------------------------------------------------
# Sublayers: projections, feed-forward, norms. Their kernels are in `transformer.model.ops`.


class Dense(nn.Module):
    """y = x . W + b, contracting x's last `contract_axes` axes [..., *in] with W [*in, *features]
    (MaxText's `DenseGeneral`): the input sizes are read from x. W's axes carry logical names."""

    features: int | tuple[int, ...]
    kernel_axes: tuple[str | None, ...]  # logical names of W's axes: input axes, then features
    kernel_init: Initializer = nn.initializers.lecun_normal()
    contract_axes: int = 1
    use_bias: bool = True
    dtype: Any = jnp.float32  # the computation's
    param_dtype: Any = jnp.float32  # the stored parameters'
    kernels: str = "auto"  # `ops.kernels`: auto | reference | cpu
    lora: Lora | None = None  # low-rank adapters beside W (`transformer.model.lora`)
    deterministic: bool = True  # no dropout on the adapters' input

    @nn.compact
    def __call__(self, x: Array) -> Array:
        n_in = self.contract_axes
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        shape = (*x.shape[x.ndim - n_in :], *features)
        if len(self.kernel_axes) != len(shape):
            raise ValueError(
                f"Dense {self.name}: kernel_axes {self.kernel_axes} name {len(self.kernel_axes)} "
                f"axes but the kernel {shape} has {len(shape)}; give one name per axis"
            )
        init = with_axes(self.kernel_init, *self.kernel_axes)
        kernel = self.param("kernel", init, shape, self.param_dtype)  # [*in, *features]
        matmul = ops.kernels(self.kernels).matmul
        y = matmul(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
        if self.lora is not None:
            y = y + self._adapters(x, shape, n_in)
        if self.use_bias:
            bias_init = with_axes(nn.initializers.zeros, *self.kernel_axes[n_in:])
            bias = self.param("bias", bias_init, features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y

    def _adapters(self, x: Array, shape: tuple[int, ...], n_in: int) -> Array:
        """(alpha / r) x A B [..., *features]; the adapters are float32 parameters, computed in
        the compute dtype, their axes named as the kernel's (so they shard as it does)."""
        lora, r = self.lora, self.lora.rank
        in_shape, in_axes = shape[:n_in], self.kernel_axes[:n_in]
        out_shape, out_axes = shape[n_in:], self.kernel_axes[n_in:]
        if lora.slots is None:
            a_shape, a_axes = (*in_shape, r), (*in_axes, "lora")
            b_shape, b_axes = (r, *out_shape), ("lora", *out_axes)
        else:  # [*in, S, r] and [S, r, *rest]: one A and B per adapted slot of the first axis
            slots = len(lora.slots)
            a_shape, a_axes = (*in_shape, slots, r), (*in_axes, None, "lora")
            b_shape, b_axes = (slots, r, *out_shape[1:]), (None, "lora", *out_axes[1:])
        a_init = with_axes(lora_module.init_a(int(np.prod(in_shape))), *a_axes)
        a = self.param("lora_a", a_init, a_shape, jnp.float32)
        b = self.param("lora_b", with_axes(nn.initializers.zeros, *b_axes), b_shape, jnp.float32)
        if lora.dropout > 0 and not self.deterministic:
            x = ops.dropout(x, lora.dropout, self.make_rng("dropout"))
        matmul = ops.kernels(self.kernels).matmul
        h = matmul(x.astype(self.dtype), a.astype(self.dtype), n_in)  # [..., (S,) r]
        if lora.slots is None:
            return lora.scale * matmul(h, b.astype(self.dtype), 1)
        per_slot = jnp.einsum("...sr,sro->...so", h, b.astype(self.dtype).reshape(slots, r, -1))
        per_slot = per_slot.reshape(*h.shape[:-2], slots, *out_shape[1:])
        zeros = jnp.zeros((*h.shape[:-2], *out_shape[1:]), self.dtype)
        pieces = [
            jnp.take(per_slot, lora.slots.index(s), axis=h.ndim - 2) if s in lora.slots else zeros
            for s in range(out_shape[0])
        ]
        return lora.scale * jnp.stack(pieces, axis=h.ndim - 2)


def dense_for(cfg: ModelConfig, deterministic: bool = True) -> Callable[..., Dense]:
    """`Dense` with the model's bias choice, dtypes and kernels bound, and the LoRA adapters the
    config puts on a projection of its name (`lora.lora_for`)."""

    def make(*, name: str, **kwargs: Any) -> Dense:
        return Dense(
            name=name,
            use_bias=cfg.use_bias,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            kernels=cfg.kernels,
            lora=lora_module.lora_for(cfg, name),
            deterministic=deterministic,
            **kwargs,
        )

    return make


class FeedForward(nn.Module):
    """Position-wise feed-forward network FFN(x) = act(x W1 + b1) W2 + b2 (sec. 3.3), or the
    gated FFN(x) = (act(x W_gate) * x W_up) W2 of SwiGLU (act = SiLU, Llama) and GeGLU (GELU),
    "GLU Variants Improve Transformer" (Shazeer 2020)."""

    config: ModelConfig
    out_scale: float = 1.0
    deterministic: bool = True  # no dropout on LoRA adapters' input

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        d, f = cfg.d_model, cfg.d_ff
        dense = dense_for(cfg, self.deterministic)
        wi_init, wo_init = kernel_init(cfg, d, f), kernel_init(cfg, f, d, self.out_scale)
        wi = functools.partial(dense, features=f, kernel_axes=("embed", "mlp"), kernel_init=wi_init)
        if cfg.gated_ffn:
            gate = wi(name="wi_gate")(x)
            gelu = ops.kernels(cfg.kernels).gelu
            gate = jax.nn.silu(gate) if cfg.activation == "swiglu" else gelu(gate)
            x = gate * wi(name="wi_up")(x)
        else:
            x = wi(name="wi")(x)
            # GPT-2 uses the tanh approximation of GELU (`ops.gelu`).
            x = jax.nn.relu(x) if cfg.activation == "relu" else ops.kernels(cfg.kernels).gelu(x)
        x = nn.with_logical_constraint(x, HIDDEN_AXES)  # [b, t, f], split over f under TP
        return dense(features=d, kernel_axes=("mlp", "embed"), kernel_init=wo_init, name="wo")(x)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis (`ops.layer_norm`, with a hand-written backward pass under
    the 'cpu' kernels); the same parameters (`scale`, `bias`) and numerics as
    `nn.LayerNorm(use_fast_variance=False)`."""

    epsilon: float = 1e-6
    use_bias: bool = True
    dtype: Any = jnp.float32  # the output's
    param_dtype: Any = jnp.float32
    kernels: str = "auto"  # `ops.kernels`: auto | reference | cpu
    scale_init: Initializer = nn.initializers.ones
    bias_init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", self.scale_init, (d,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (d,), self.param_dtype) if self.use_bias else None
        layer_norm = ops.kernels(self.kernels).layer_norm
        return layer_norm(x, scale, bias, self.epsilon).astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis (`ops.rms_norm`, with a hand-written backward pass under the
    'cpu' kernels); the same parameter (`scale`) and numerics as `nn.RMSNorm`."""

    epsilon: float = 1e-6
    dtype: Any = jnp.float32  # the output's
    param_dtype: Any = jnp.float32
    kernels: str = "auto"  # `ops.kernels`: auto | reference | cpu
    scale_init: Initializer = nn.initializers.ones

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", self.scale_init, (x.shape[-1],), self.param_dtype)
        return ops.kernels(self.kernels).rms_norm(x, scale, self.epsilon).astype(self.dtype)


class Dropout(nn.Module):
    """`nn.Dropout`'s interface over `ops.dropout` (16 random bits per element, not 32): the
    same keep rate to within 2^-17, half the random-number work."""

    rate: float
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: Array, deterministic: bool | None = None) -> Array:
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if deterministic or self.rate == 0.0:
            return x
        return ops.dropout(x, self.rate, self.make_rng("dropout"))


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    """The configured norm over d_model, its parameters named on the `embed` axis."""
    numerics = dict(
        epsilon=cfg.norm_epsilon,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        kernels=cfg.kernels,
    )
    scale_init = with_axes(nn.initializers.ones, "embed")
    if cfg.norm_type == "rmsnorm":
        return RMSNorm(**numerics, scale_init=scale_init, name=name)
    bias_init = with_axes(nn.initializers.zeros, "embed")
    return LayerNorm(
        **numerics, use_bias=cfg.use_bias, scale_init=scale_init, bias_init=bias_init, name=name
    )
