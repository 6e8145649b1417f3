"""Multi-head attention (sec. 3.2.2): self-attention over fused projections, cross-attention,
rotary positions, grouped-query attention and the KV cache of decoding. Shapes use the legend at
the top of `transformer/model/layers.py`; the arithmetic is `transformer.model.ops`."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer.model import ops
from transformer.model.config import ModelConfig
from transformer.model.layers import HEADS_AXES, QKV_AXES, dense_for, kernel_init

Array = jax.Array

# The named scope of softmax(Q K^T / sqrt(d_k)) V itself (not the projections): XLA's op names
# carry it, so profiles can tell attention from the rest (`benchmarks/profile_trace.py`).
ATTENTION_SCOPE = "sdpa"


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
        dense = dense_for(cfg, self.deterministic)
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
                with jax.named_scope(ATTENTION_SCOPE):
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
        dense = dense_for(cfg, self.deterministic)
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
        """`attention_impl`, with 'auto' resolved (`ops.resolve_auto`): the platform's fused
        kernel (cuDNN's on a GPU) for self-attention when nothing needs the weights, nothing is
        decoded and the kernel serves the dtype and head width; the explicit formula ('einsum')
        otherwise."""
        cfg = self.config
        if cfg.attention_impl != "auto":
            return cfg.attention_impl
        impl = ops.resolve_auto()[1]
        fused = (
            not self.cross
            and cache_index is None
            and not self._needs_weights()
            and ops.fused_attention_serves(impl, cfg.compute_dtype, cfg.head_dim)
        )
        return impl if fused else "einsum"

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
        with jax.named_scope(ATTENTION_SCOPE):
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
        kv = dense_for(cfg, self.deterministic)(
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
