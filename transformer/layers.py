"""The Transformer's layers, shared by the encoder-decoder and GPT ("Attention Is All You Need").

Shape legend used in comments throughout the package:
  b batch, t query length, s key length, n heads, k key/value heads (n with multi-head
  attention, fewer with grouped-query attention), h head dim (d_k = d_v), d model width,
  f feed-forward hidden width, v vocabulary, l layers.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`,
`layers`);
activations are constrained under names of their own (`activation_batch`, `activation_embed`,
...) at block and embedding outputs, on the attention projections and on the FFN hidden units.
`transformer.sharding` maps both onto a device mesh with one small rules table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer import ops
from transformer.config import ModelConfig

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
# Sublayers: projections, attention, feed-forward, norms. Their kernels are in `transformer.ops`.


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
        if self.use_bias:
            bias_init = with_axes(nn.initializers.zeros, *self.kernel_axes[n_in:])
            bias = self.param("bias", bias_init, features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def dense_for(cfg: ModelConfig) -> Callable[..., Dense]:
    """`Dense` with the model's bias choice, dtypes and kernels bound."""
    return functools.partial(
        Dense,
        use_bias=cfg.use_bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        kernels=cfg.kernels,
    )


class MultiHeadAttention(nn.Module):
    """Multi-head attention (sec. 3.2.2): self-attention with one fused QKV projection, or
    cross-attention (queries from the decoder, keys and values from the encoder output).

    Two switches of the modern decoder: with `positions='rope'` self-attention rotates queries
    and keys by their positions (`ops.apply_rotary`); with `num_kv_heads` k < n, keys and values
    have k heads, each shared by n / k query heads (grouped-query attention, Ainslie et al.
    2023), projected by `query` [d, n, h] and `key_value` [d, 2, k, h] instead of `qkv`.

    Decoding: given `cache_index` (a scalar), self-attention writes this call's keys and values
    into the 'cache' collection at [cache_index, cache_index + t) and attends over the whole
    buffer (the caller's mask hides unwritten slots). Cross-attention stores the projected
    encoder keys and values on the call that passes `memory`, and reuses them on later calls
    that pass `memory=None`.
    """

    config: ModelConfig
    cross: bool = False
    deterministic: bool = True
    out_scale: float = 1.0  # GPT-2 scales residual projections by 1/sqrt(2 * layers)
    causal: bool = False  # self-attention masks are always at least causal (decoders)

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        memory: Array | None = None,
        cache_index: Array | None = None,
        positions: Array | None = None,
    ) -> Array:
        cfg = self.config
        n, h, d = cfg.num_heads, cfg.head_dim, cfg.d_model
        dense = dense_for(cfg)
        xavier = kernel_init(cfg, d, d)
        if self.cross:
            query = dense(
                features=(n, h),
                kernel_axes=("embed", "heads", "kv"),
                kernel_init=xavier,
                name="query",
            )(x)
            query = nn.with_logical_constraint(query, HEADS_AXES)  # [b, t, n, h]
            key, value = self._cross_keys_values(memory, cache_index)
            out = self._dot_product_attention(query, key, value, mask)
        else:
            qkv, query, key, value = self._self_projections(x, positions)
            fused = ops.kernels(cfg.kernels).self_attention
            if fused is not None and self._use_fused_self_attention(cache_index):
                if qkv is None:  # grouped: to the fused layout, each kv head repeated n / k times
                    groups = n // cfg.kv_heads
                    key, value = (jnp.repeat(a, groups, axis=2) for a in (key, value))
                    qkv = jnp.stack([query, key, value], axis=2)  # [b, t, 3, n, h]
                out = fused(qkv, mask, self.causal and mask is not None)
            else:
                if cache_index is not None:
                    key, value = self._append_to_cache(key, value, cache_index)
                out = self._dot_product_attention(query, key, value, mask, cache_index)
        return dense(
            features=d,
            kernel_axes=("heads", "kv", "embed"),
            kernel_init=kernel_init(cfg, d, d, self.out_scale),
            contract_axes=2,  # n and h
            name="out",
        )(out)  # [b, t, d]

    def _self_projections(
        self, x: Array, positions: Array | None
    ) -> tuple[Array | None, Array, Array, Array]:
        """(fused qkv [b, t, 3, n, h] or None, queries [b, t, n, h], keys and values
        [b, t, k, h]), rotated by their positions under rotary positions. The fused array is
        returned for multi-head attention (k = n), None for grouped-query attention."""
        cfg = self.config
        n, k, h, d = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.d_model
        dense = dense_for(cfg)
        xavier = kernel_init(cfg, d, d)
        if k == n:
            qkv = dense(
                features=(3, n, h),
                kernel_axes=("embed", None, "heads", "kv"),
                kernel_init=xavier,
                name="qkv",
            )(x)
            qkv = nn.with_logical_constraint(qkv, QKV_AXES)  # [b, t, 3, n, h]
            if cfg.positions == "rope":  # queries and keys turn, values do not
                qkv = ops.apply_rotary(qkv, self._positions(positions), cfg.rope_theta, turned=2)
            return qkv, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        query = dense(
            features=(n, h),
            kernel_axes=("embed", "heads", "kv"),
            kernel_init=xavier,
            name="query",
        )(x)
        kv = dense(
            features=(2, k, h),
            kernel_axes=("embed", None, "kv_heads", "kv"),
            kernel_init=kernel_init(cfg, d, k * h),
            name="key_value",
        )(x)
        query = nn.with_logical_constraint(query, HEADS_AXES)  # [b, t, n, h]
        kv = nn.with_logical_constraint(kv, QKV_AXES)  # [b, t, 2, k, h]
        if cfg.positions == "rope":
            positions = self._positions(positions)
            query = ops.apply_rotary(query, positions, cfg.rope_theta)
            kv = ops.apply_rotary(kv, positions, cfg.rope_theta, turned=1)
        return None, query, kv[:, :, 0], kv[:, :, 1]

    @staticmethod
    def _positions(positions: Array | None) -> Array:
        if positions is None:
            raise ValueError("rotary positions need the token positions; pass `positions`")
        return positions

    def _use_fused_self_attention(self, cache_index: Array | None) -> bool:
        """Under the 'cpu' kernels, training and scoring take `ops.self_attention` (the same
        result for every query that sees a key, and a faster backward pass). The plain
        `ops.dot_product_attention` takes the rest: decoding into the cache, dropout on the
        weights, the `jax.nn` kernels (`attention_impl` other than 'einsum'), and a caller who
        wants the weights.

        A caller asks for the weights the Flax way, `apply(..., mutable=['intermediates'])`, and
        the layer reads that from its scope: the fused op never forms the weights, and a module
        field would make inspecting a trained model need a different config."""
        return (
            cache_index is None
            and self._attention_impl(cache_index) == "einsum"
            and not self._needs_weights()
        )

    def _needs_weights(self) -> bool:
        """Whether this call needs the [b, n, t, s] attention weights formed: dropout on them in
        training, or a caller inspecting them."""
        dropout = not self.deterministic and self.config.attention_dropout_rate > 0
        return dropout or self.is_mutable_collection("intermediates")

    def _attention_impl(self, cache_index: Array | None) -> str:
        """`attention_impl`, with 'auto' resolved: cuDNN's fused attention for self-attention on
        a GPU in bfloat16 or float16 when nothing needs the weights and nothing is decoded, with
        heads at most 128 wide in multiples of 8 (cuDNN's limits); the explicit formula
        ('einsum') otherwise."""
        cfg = self.config
        if cfg.attention_impl != "auto":
            return cfg.attention_impl
        cudnn = (
            jax.default_backend() == "gpu"
            and not self.cross
            and cache_index is None
            and cfg.compute_dtype in (jnp.bfloat16, jnp.float16)
            and cfg.head_dim % 8 == 0
            and cfg.head_dim <= 128
            and not self._needs_weights()
        )
        return "cudnn" if cudnn else "einsum"

    def _dot_product_attention(
        self,
        query: Array,
        key: Array,
        value: Array,
        mask: Array | None,
        cache_index: Array | None = None,
    ) -> Array:
        """[b, t, n, h] from queries [b, t, n, h] over keys and values [b, s, n, h], with dropout
        on the weights in training; the weights are sown as 'attention_weights'."""
        cfg = self.config
        dropout_rng = None
        if not self.deterministic and cfg.attention_dropout_rate > 0:
            dropout_rng = self.make_rng("dropout")
        out, weights = ops.dot_product_attention(
            query,
            key,
            value,
            mask,
            dropout_rate=cfg.attention_dropout_rate,
            dropout_rng=dropout_rng,
            impl=self._attention_impl(cache_index),
            # The mask hides later keys in self-attention (not over a cache, whose queries sit
            # at an offset): fused kernels can skip them.
            causal=self.causal and cache_index is None,
        )
        if weights is not None:  # 'einsum' only; kept only if 'intermediates' is mutable
            self.sow("intermediates", "attention_weights", weights)
        return out

    def _append_to_cache(self, key: Array, value: Array, index: Array) -> tuple[Array, Array]:
        # At cache creation the input spans the whole buffer, so its shape is the buffer's.
        cached_key = self.variable("cache", "key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "value", jnp.zeros, value.shape, value.dtype)
        if self.is_initializing():
            return key, value
        start = (0, index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key, start)
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
        return cached_key.value, cached_value.value  # [b, s, n, h] with s = buffer length

    def _cross_keys_values(
        self, memory: Array | None, cache_index: Array | None
    ) -> tuple[Array, Array]:
        cfg = self.config
        if memory is None:
            if not self.has_variable("cache", "cross_key"):
                raise ValueError(
                    "cross-attention needs the encoder output (memory) or a cache "
                    "filled by a previous call that passed it"
                )
            return (
                self.get_variable("cache", "cross_key"),
                self.get_variable("cache", "cross_value"),
            )
        k, h, d = cfg.kv_heads, cfg.head_dim, cfg.d_model
        kv = dense_for(cfg)(
            features=(2, k, h),
            kernel_axes=("embed", None, "kv_heads", "kv"),
            kernel_init=kernel_init(cfg, d, k * h),
            name="key_value",
        )(memory)
        kv = nn.with_logical_constraint(kv, QKV_AXES)  # [b, s, 2, k, h]
        key, value = kv[:, :, 0], kv[:, :, 1]
        if cache_index is not None:  # computed once per source sentence, reused every step
            self.put_variable("cache", "cross_key", key)
            self.put_variable("cache", "cross_value", value)
        return key, value


class FeedForward(nn.Module):
    """Position-wise feed-forward network FFN(x) = act(x W1 + b1) W2 + b2 (sec. 3.3), or the
    gated FFN(x) = (act(x W_gate) * x W_up) W2 of SwiGLU (act = SiLU, Llama) and GeGLU (GELU),
    "GLU Variants Improve Transformer" (Shazeer 2020)."""

    config: ModelConfig
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        d, f = cfg.d_model, cfg.d_ff
        dense = dense_for(cfg)
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


# ---------------------------------------------------------------------------------------------
# Blocks and stacks.


class TransformerBlock(nn.Module):
    """One encoder or decoder layer: self-attention, optional cross-attention, FFN, each wrapped
    in a residual connection with dropout and normalisation.

    post-norm (sec. 3.1, 5.4): x = LayerNorm(x + Dropout(Sublayer(x)))
    pre-norm (GPT-2):          x = x + Dropout(Sublayer(LayerNorm(x)))
    """

    config: ModelConfig
    cross: bool = False
    deterministic: bool = True
    out_scale: float = 1.0
    scanned: bool = False  # nn.scan wants (carry, output) back
    causal: bool = False  # the self-attention mask always hides later positions

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        memory: Array | None,
        memory_mask: Array | None,
        cache_index: Array | None,
        positions: Array | None = None,
    ) -> Any:
        cfg = self.config

        def residual(y: Array, sublayer: Callable[[Array], Array], norm_name: str) -> Array:
            norm = make_norm(cfg, norm_name)
            drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
            if cfg.norm_position == "pre":
                return y + drop(sublayer(norm(y)))
            return norm(y + drop(sublayer(y)))

        attention = functools.partial(
            MultiHeadAttention, cfg, deterministic=self.deterministic, out_scale=self.out_scale
        )
        x = residual(
            x,
            lambda y: attention(causal=self.causal, name="self_attention")(
                y, mask, None, cache_index, positions
            ),
            "norm_self_attention",
        )
        if self.cross:
            x = residual(
                x,
                lambda y: attention(cross=True, name="cross_attention")(
                    y, memory_mask, memory, cache_index
                ),
                "norm_cross_attention",
            )
        x = residual(x, FeedForward(cfg, out_scale=self.out_scale, name="mlp"), "norm_mlp")
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        return (x, None) if self.scanned else x


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Stack(nn.Module):
    """`num_layers` blocks (unrolled, or one block under `nn.scan`), then a final norm when the
    blocks are pre-norm (GPT-2's ln_f: pre-norm leaves the residual stream unnormalised)."""

    config: ModelConfig
    num_layers: int
    cross: bool = False
    # A decoder: every self-attention mask it is given hides later positions (the caller's
    # mask may hide more), which lets training skip the fully masked half of attention.
    causal: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        memory: Array | None = None,
        memory_mask: Array | None = None,
        cache_index: Array | None = None,
        deterministic: bool = True,
        positions: Array | None = None,  # [b, t], for rotary positions
    ) -> Array:
        cfg = self.config
        block: Any = TransformerBlock
        if cfg.remat_policy != "none":
            block = nn.remat(
                block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
            )
        # GPT-2: residual projections scaled by 1/sqrt(number of residual additions).
        out_scale = 1.0 / np.sqrt((3 if self.cross else 2) * self.num_layers)
        kwargs = dict(
            cross=self.cross, deterministic=deterministic, out_scale=out_scale, causal=self.causal
        )
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 5,
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(cfg, scanned=True, name="layers", **kwargs)(
                x, mask, memory, memory_mask, cache_index, positions
            )
        else:
            for i in range(self.num_layers):
                x = block(cfg, name=f"layers_{i}", **kwargs)(
                    x, mask, memory, memory_mask, cache_index, positions
                )
        if cfg.norm_position == "pre":
            x = make_norm(cfg, "final_norm")(x)
        return x
