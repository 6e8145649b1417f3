"""The Transformer's layers, shared by the encoder-decoder and GPT ("Attention Is All You Need").

Shape legend used in comments throughout the package:
  b batch, t query length, s key length, n heads, h head dim (d_k = d_v), d model width,
  f feed-forward hidden width, v vocabulary, l layers.

Every parameter carries logical axis names (`embed`, `heads`, `kv`, `mlp`, `vocab`, `layers`);
`transformer.sharding` maps them onto a device mesh with one small rules table.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer.config import ModelConfig

Array = jax.Array
Initializer = Callable[..., Array]


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


def combine_masks(*masks: Array | None) -> Array | None:
    present = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, present) if present else None


# ---------------------------------------------------------------------------------------------
# Attention.


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    impl: str = "einsum",
) -> tuple[Array, Array | None]:
    """softmax(Q K^T / sqrt(d_k)) V over heads (sec. 3.2.1), returning (output, weights).

    query [b, t, n, h], key and value [b, s, n, h], mask broadcastable to [b, n, t, s].
    Scores and softmax are float32 whatever the compute dtype; masked scores are set to the
    most negative float32, not -inf, so a fully masked row stays finite. `impl` 'xla' or
    'cudnn' call `jax.nn.dot_product_attention` (fused; weights are not returned).
    """
    depth = query.shape[-1]
    if impl != "einsum":
        if dropout_rate > 0 and dropout_rng is not None:
            raise ValueError(f"attention_impl={impl!r} has no attention dropout; use 'einsum'")
        out = jax.nn.dot_product_attention(
            query, key, value, mask=mask, implementation=None if impl == "xla" else impl
        )
        return out, None
    # sec. 3.2.1: scale by 1/sqrt(d_k) so the softmax does not saturate for large d_k. Scaling q
    # first costs b*t*n*h multiplies instead of b*n*t*s.
    query = query / jnp.sqrt(depth).astype(query.dtype)
    scores = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)  # [b, n, t, s], float32
    if dropout_rate > 0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bnts,bsnh->btnh", weights.astype(value.dtype), value)
    return out, weights


def _query_blocks(length: int, causal: bool) -> list[tuple[int, int, int]]:
    """(query start, query end, keys seen) per block of query rows. Under a causal mask the
    first half of the queries sees only the first half of the keys: computing that block apart
    skips the fully masked quarter of every [t, s] product and softmax."""
    if causal and length % 2 == 0 and length >= _CAUSAL_SPLIT_MIN_LENGTH:
        half = length // 2
        return [(0, half, half), (half, length, length)]
    return [(0, length, length)]


_CAUSAL_SPLIT_MIN_LENGTH = 64  # below this the extra, smaller products cost more than they save


def _mask_block(mask: Array | None, start: int, end: int, keys: int) -> Array | None:
    if mask is None:
        return None
    rows = slice(start, end) if mask.shape[-2] > 1 else slice(None)
    cols = slice(0, keys) if mask.shape[-1] > 1 else slice(None)
    return mask[..., rows, cols]


def _attend_forward(q: Array, k: Array, v: Array, mask: Array | None) -> tuple[Array, ...]:
    """Head-major [b, n, t, h] queries over [b, n, s, h] keys and values: the output
    [b, n, t, h] and what the backward pass needs."""
    scores = _batched_matmul(q, k, 3, 3, jnp.float32)  # [b, n, t, s]
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    # Unnormalised exp(scores - max) times V, divided by the row sums afterwards: the division
    # touches [b, n, t, h] instead of [b, n, t, s].
    exp = jnp.exp(scores - scores.max(-1, keepdims=True))  # [b, n, t, s]
    inv_sum = 1.0 / exp.sum(-1, keepdims=True)  # [b, n, t, 1]
    out = _batched_matmul(exp.astype(v.dtype), v, 3, 2, jnp.float32)  # [b, n, t, h]
    return (out * inv_sum).astype(v.dtype), exp, inv_sum


def _self_attention_forward(
    qkv: Array, mask: Array | None, causal: bool
) -> tuple[Array, tuple[Array, ...]]:
    # Head-major [3, b, n, t, h] once, so every product below is a plain batched matmul.
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)
    q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    outs, saved = [], []
    for start, end, keys in _query_blocks(q.shape[2], causal):
        block_mask = _mask_block(mask, start, end, keys)
        out, exp, inv_sum = _attend_forward(
            q[:, :, start:end], k[:, :, :keys], v[:, :, :keys], block_mask
        )
        outs.append(out)
        saved.append((block_mask, exp, inv_sum))
    out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]  # [b, n, t, h]
    return out.transpose(0, 2, 1, 3), (qkv, tuple(saved), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _self_attention(qkv: Array, mask: Array | None, causal: bool) -> Array:
    """Attention output [b, t, n, h] from fused projections qkv [b, t, 3, n, h], with a
    hand-written backward pass (below). `causal` promises that `mask` hides every key after its
    query (it may hide more), so the block of later keys for earlier queries is skipped.

    A query that sees no key at all (padding) gets an average of the values it was offered (all
    of them, or with `causal` the first half for a query in the first half) and passes no
    gradient back to its scores; padding must not feed anything that counts."""
    return _self_attention_forward(qkv, mask, causal)[0]


def _self_attention_backward(
    causal: bool, residuals: tuple[Array, ...], d_out: Array
) -> tuple[Array, None]:
    # With P = softmax(S), O = P V: dV = P^T dO, dP = dO V^T and
    # dS = P * (dP - rowsum(dO * O)), since rowsum(P * dP) = rowsum(dO * O) (FlashAttention).
    # The products over t (dV, dK) are computed transposed, [b, n, h, s], so that the
    # [b, n, t, s] operand is read in place and only small [b, n, h, t] operands are transposed;
    # those transposes start from [b, t, ...] layouts so XLA cannot fold them back into the dot.
    qkv, saved, out = residuals
    dtype = qkv.dtype
    length = qkv.shape[1]
    scale = 1.0 / jnp.sqrt(qkv.shape[-1]).astype(dtype)
    _, k, v = qkv.transpose(2, 0, 3, 1, 4)  # [b, n, s, h]
    q_t = qkv[:, :, 0].transpose(0, 2, 3, 1) * scale  # [b, n, h, t]
    d_out_t = d_out.transpose(0, 2, 3, 1)  # [b, n, h, t]
    d_out_h = d_out.transpose(0, 2, 1, 3)  # [b, n, t, h]
    row = jnp.sum(d_out_h.astype(jnp.float32) * out, -1, keepdims=True)  # [b, n, t, 1]
    d_q, d_k_t, d_v_t = [], 0.0, 0.0
    for (start, end, keys), (mask, exp, inv_sum) in zip(
        _query_blocks(length, causal), saved, strict=True
    ):
        rows = slice(start, end)
        d_v = _batched_matmul(
            d_out_t[..., rows] * inv_sum.swapaxes(2, 3).astype(dtype), exp.astype(dtype), 3, 2
        )  # [b, n, h, keys]
        d_weights = _batched_matmul(d_out_h[:, :, rows], v[:, :, :keys], 3, 3, jnp.float32)
        d_scores = exp * inv_sum * (d_weights - row[:, :, rows])  # [b, n, end - start, keys]
        if (
            mask is not None
        ):  # masked scores are constants: no gradient (matters in all-masked rows)
            d_scores = jnp.where(mask, d_scores, 0.0)
        d_scores = d_scores.astype(dtype)
        d_q.append(_batched_matmul(d_scores, k[:, :, :keys], 3, 2) * scale)  # [b, n, rows, h]
        d_k = _batched_matmul(q_t[..., rows], d_scores, 3, 2)  # [b, n, h, keys]
        pad = [(0, 0)] * 3 + [(0, length - keys)]
        d_k_t = d_k_t + (jnp.pad(d_k, pad) if keys < length else d_k)
        d_v_t = d_v_t + (jnp.pad(d_v, pad) if keys < length else d_v)
    d_q = jnp.concatenate(d_q, axis=2) if len(d_q) > 1 else d_q[0]  # [b, n, t, h]
    # Straight to [b, t, 3, n, h]: a plain swap of the last two axes of d_k_t and d_v_t would be
    # folded into their products, undoing the choice above.
    d_qkv = [d_q.transpose(0, 2, 1, 3), d_k_t.transpose(0, 3, 1, 2), d_v_t.transpose(0, 3, 1, 2)]
    return jnp.stack(d_qkv, axis=2), None


_self_attention.defvjp(_self_attention_forward, _self_attention_backward)


def _batched_matmul(a: Array, b: Array, a_axis: int, b_axis: int, dtype: Any = None) -> Array:
    """Product over batch axes (0, 1) contracting a's `a_axis` with b's `b_axis`."""
    dims = (((a_axis,), (b_axis,)), ((0, 1), (0, 1)))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul(x: Array, kernel: Array, n_in: int) -> Array:
    """x [..., *in] . W [*in, *out], contracting x's last `n_in` axes with W's first."""
    lead = x.ndim - n_in
    contract = (tuple(range(lead, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


def _matmul_forward(x: Array, kernel: Array, n_in: int) -> tuple[Array, tuple[Array, Array]]:
    return _matmul(x, kernel, n_in), (x, kernel)


def _matmul_backward(n_in: int, residuals: tuple[Array, Array], dy: Array) -> tuple[Array, Array]:
    x, kernel = residuals
    lead = x.ndim - n_in
    out_axes = tuple(range(lead, dy.ndim))
    dx = jax.lax.dot_general(dy, kernel, ((out_axes, tuple(range(n_in, kernel.ndim))), ((), ())))
    # dW sums over batch and length. Contracting them as one flattened axis lets XLA on CPU run
    # a transposed-operand matrix product directly; autodiff's form (two contracting axes, then a
    # transpose) makes it copy an operand into a transposed layout first, and the fused copy of
    # a residual-stream gradient recomputes that gradient's whole chain, once per layer.
    # The input features are flattened too (their leading axis is the sharded one, if any).
    x_rows = x.reshape(-1, int(np.prod(x.shape[lead:])))  # [b * t, in]
    dy_rows = dy.reshape(-1, *dy.shape[lead:])  # [b * t, *out]
    dw = jax.lax.dot_general(x_rows, dy_rows, (((0,), (0,)), ((), ())))  # [in, *out]
    return dx, dw.reshape(kernel.shape)


_matmul.defvjp(_matmul_forward, _matmul_backward)


class Dense(nn.Module):
    """x [..., *in] . W [*in, *out] + b [*out]; W's axes carry logical names."""

    config: ModelConfig
    in_features: tuple[int, ...]
    out_features: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names of W's axes: in axes, then out axes
    init: Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        n_in = len(self.in_features)
        kernel = self.param(
            "kernel",
            with_axes(self.init, *self.axes),
            (*self.in_features, *self.out_features),
            cfg.params_dtype,
        )
        y = _matmul(x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype), n_in)
        if cfg.use_bias:
            bias = self.param(
                "bias",
                with_axes(nn.initializers.zeros, *self.axes[n_in:]),
                self.out_features,
                cfg.params_dtype,
            )
            y = y + bias.astype(cfg.compute_dtype)
        return y


class MultiHeadAttention(nn.Module):
    """Multi-head attention (sec. 3.2.2): self-attention with one fused QKV projection, or
    cross-attention (queries from the decoder, keys and values from the encoder output).

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
    ) -> Array:
        cfg = self.config
        n, h = cfg.num_heads, cfg.head_dim
        d = cfg.d_model
        xavier = kernel_init(cfg, d, d)
        if not self.cross:
            qkv = Dense(cfg, (d,), (3, n, h), ("embed", None, "heads", "kv"), xavier, name="qkv")(
                x
            )  # [b, t, 3, n, h]
        if not self.cross and self._fused(cache_index):
            out = _self_attention(qkv, mask, self.causal and mask is not None)
        else:
            if not self.cross:
                query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
                if cache_index is not None:
                    key, value = self._append_to_cache(key, value, cache_index)
            else:
                query = Dense(cfg, (d,), (n, h), ("embed", "heads", "kv"), xavier, name="query")(x)
                key, value = self._cross_keys_values(memory, cache_index)
            dropout_rng = None
            if not self.deterministic and cfg.attention_dropout_rate > 0:
                dropout_rng = self.make_rng("dropout")
            out, weights = dot_product_attention(
                query,
                key,
                value,
                mask,
                dropout_rate=cfg.attention_dropout_rate,
                dropout_rng=dropout_rng,
                impl=cfg.attention_impl,
            )
            if weights is not None:
                self.sow("intermediates", "attention_weights", weights)  # for inspection only
        out_init = kernel_init(cfg, d, d, self.out_scale)
        return Dense(cfg, (n, h), (d,), ("heads", "kv", "embed"), out_init, name="out")(
            out
        )  # [b, t, d]

    def _fused(self, cache_index: Array | None) -> bool:
        """Training and scoring self-attention take `_self_attention` (the same result for
        every query that sees a key, and a faster backward pass); decoding, dropout on the
        weights, inspecting them, or the fused `jax.nn` kernels take `dot_product_attention`."""
        cfg = self.config
        return (
            cache_index is None
            and cfg.attention_impl == "einsum"
            and (self.deterministic or cfg.attention_dropout_rate == 0)
            and not self.is_mutable_collection("intermediates")
        )

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
        n, h, d = cfg.num_heads, cfg.head_dim, cfg.d_model
        kv = Dense(
            cfg,
            (d,),
            (2, n, h),
            ("embed", None, "heads", "kv"),
            kernel_init(cfg, d, d),
            name="key_value",
        )(memory)  # [b, s, 2, n, h]
        key, value = kv[:, :, 0], kv[:, :, 1]
        if cache_index is not None:  # computed once per source sentence, reused every step
            self.put_variable("cache", "cross_key", key)
            self.put_variable("cache", "cross_value", value)
        return key, value


class FeedForward(nn.Module):
    """Position-wise feed-forward network FFN(x) = act(x W1 + b1) W2 + b2 (sec. 3.3)."""

    config: ModelConfig
    out_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        d, f = cfg.d_model, cfg.d_ff
        x = Dense(cfg, (d,), (f,), ("embed", "mlp"), kernel_init(cfg, d, f), name="wi")(x)
        # GPT-2 uses the tanh approximation of GELU; jax.nn.gelu's default is that one.
        x = jax.nn.relu(x) if cfg.activation == "relu" else _gelu(x)
        wo_init = kernel_init(cfg, f, d, self.out_scale)
        return Dense(cfg, (f,), (d,), ("mlp", "embed"), wo_init, name="wo")(x)  # [b, t, d]


_GELU_C = float(np.sqrt(2.0 / np.pi))


@jax.custom_vjp
def _gelu(u: Array) -> Array:
    """GELU, tanh approximation (GPT-2): the forward pass of `jax.nn.gelu(u, approximate=True)`;
    the backward pass recomputes tanh from u in one fused pass instead of saving it."""
    return jax.nn.gelu(u, approximate=True)


def _gelu_forward(u: Array) -> tuple[Array, Array]:
    return _gelu(u), u


def _gelu_backward(u: Array, dy: Array) -> tuple[Array]:
    x = u.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (x + 0.044715 * x**3))
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return ((dy.astype(jnp.float32) * slope).astype(u.dtype),)


_gelu.defvjp(_gelu_forward, _gelu_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: Array, scale: Array, bias: Array | None, epsilon: float) -> Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, statistics in float32."""
    return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(
    x: Array, scale: Array, bias: Array | None, epsilon: float
) -> tuple[Array, tuple[Array, ...]]:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    centred = x32 - mean
    rstd = jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + epsilon)
    y = centred * (rstd * scale.astype(jnp.float32))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y, (x, mean, rstd, scale, bias)


def _layer_norm_backward(
    epsilon: float, residuals: tuple[Array, ...], dy: Array
) -> tuple[Array, Array, Array | None]:
    # With n = (x - mean) * rstd and g = dy * scale:
    #   dx = rstd * (g - mean(g) - n * mean(g * n)),  dscale = sum(dy * n),  dbias = sum(dy).
    # Autodiff of the two-pass variance gets the same numbers in more passes over [b, t, d]
    # (and on CPU materialises the scale broadcast to [b, t, d] for each of them).
    x, mean, rstd, scale, bias = residuals
    dy = dy.astype(jnp.float32)
    normed = (x.astype(jnp.float32) - mean) * rstd
    rows = tuple(range(x.ndim - 1))
    d_scale = (dy * normed).sum(rows).astype(scale.dtype)
    d_bias = None if bias is None else dy.sum(rows).astype(bias.dtype)
    g = dy * scale.astype(jnp.float32)
    dx = rstd * (g - g.mean(-1, keepdims=True) - normed * (g * normed).mean(-1, keepdims=True))
    return dx.astype(x.dtype), d_scale, d_bias


_layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with a hand-written backward pass; the same parameters
    (`scale`, `bias`) and numerics as `flax.linen.LayerNorm(use_fast_variance=False)`."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        d = x.shape[-1]
        scale = self.param(
            "scale", with_axes(nn.initializers.ones, "embed"), (d,), cfg.params_dtype
        )
        bias = None
        if cfg.use_bias:
            bias = self.param(
                "bias", with_axes(nn.initializers.zeros, "embed"), (d,), cfg.params_dtype
            )
        return _layer_norm(x, scale, bias, cfg.norm_epsilon).astype(cfg.compute_dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    if cfg.norm_type == "rmsnorm":
        return nn.RMSNorm(
            epsilon=cfg.norm_epsilon,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.params_dtype,
            scale_init=with_axes(nn.initializers.ones, "embed"),
            name=name,
        )
    return LayerNorm(cfg, name=name)


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
                y, mask, None, cache_index
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
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
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
                in_axes=(nn.broadcast,) * 4,
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(cfg, scanned=True, name="layers", **kwargs)(
                x, mask, memory, memory_mask, cache_index
            )
        else:
            for i in range(self.num_layers):
                x = block(cfg, name=f"layers_{i}", **kwargs)(
                    x, mask, memory, memory_mask, cache_index
                )
        if cfg.norm_position == "pre":
            x = make_norm(cfg, "final_norm")(x)
        return x


# ---------------------------------------------------------------------------------------------
# Embeddings.


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (sec. 3.5)."""
    position = np.arange(max_len, dtype=np.float64)[:, None]
    inv_freq = np.exp(-np.log(10000.0) * np.arange(0, d_model, 2) / d_model)
    table = np.zeros((max_len, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(position * inv_freq)
    table[:, 1::2] = np.cos(position * inv_freq)
    return table.astype(np.float32)


class Embed(nn.Module):
    """Token embedding (x sqrt(d_model) in the paper, sec. 3.4) plus positions, then dropout;
    `attend` is the tied pre-softmax projection that reuses the same matrix (sec. 3.4)."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        std = cfg.init_std if cfg.init_std > 0 else cfg.d_model**-0.5
        self.token_embedding = self.param(
            "token_embedding",
            with_axes(nn.initializers.normal(std), "vocab", "embed"),
            (cfg.vocab_size, cfg.d_model),
            cfg.params_dtype,
        )
        if cfg.positions == "learned":
            self.position_embedding = self.param(
                "position_embedding",
                with_axes(nn.initializers.normal(cfg.init_std or 0.02), None, "embed"),
                (cfg.max_len, cfg.d_model),
                cfg.params_dtype,
            )
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(self, tokens: Array, positions: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        # The tables whole along d_model (under FSDP, gathered as any weight is before use): a
        # lookup into a table split along d_model gives rows split along d_model, which the
        # partitioner cannot turn into the batch-split activations without replicating them.
        table = nn.with_logical_constraint(self.token_embedding, ("vocab", None))
        x = jnp.take(table, tokens, axis=0)  # [b, t, d]
        if cfg.scale_embeddings:
            x = x * np.sqrt(cfg.d_model)
        if cfg.positions == "learned":
            table = nn.with_logical_constraint(self.position_embedding, (None, None))
            x = x + jnp.take(table, positions, axis=0)
        else:
            x = x + jnp.asarray(sinusoidal_table(cfg.max_len, cfg.d_model))[positions]
        x = self.dropout(x, deterministic=deterministic)
        return nn.with_logical_constraint(x.astype(cfg.compute_dtype), ("batch", "length", "embed"))

    def attend(self, x: Array) -> Array:
        """Logits x E^T, accumulated and returned in float32."""
        embedding = self.token_embedding.astype(self.config.compute_dtype)
        return jnp.einsum("btd,vd->btv", x, embedding, preferred_element_type=jnp.float32)
