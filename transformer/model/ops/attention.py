"""Scaled dot-product attention (sec. 3.2.1): the plain formula, and fused self-attention with a
hand-written backward pass. Shapes use the legend at the top of `transformer/model/layers.py`."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from transformer.model.ops.dropout import dropout

Array = jax.Array


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    mask: Array | None = None,
    *,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    impl: str = "einsum",
    causal: bool = False,
) -> tuple[Array, Array | None]:
    """softmax(Q K^T / sqrt(d_k)) V over heads (sec. 3.2.1), returning (output, weights).

    query [b, t, n, h], key and value [b, s, k, h], mask broadcastable to [b, n, t, s]. With
    k < n heads of keys and values (grouped-query attention), query head i attends with key
    and value head i // (n / k). Scores and softmax are float32 whatever the compute dtype;
    masked scores are set to the most negative float32, not -inf, so a fully masked row stays
    finite. `impl` 'xla' or 'cudnn' call `jax.nn.dot_product_attention` (fused; weights are not
    returned). `causal` promises that `mask` hides every key after its query (t = s, no cache
    offset): the fused kernels are then told so (`is_causal`), and cuDNN skips the blocks of
    keys above the diagonal instead of computing them and masking them out.
    """
    depth = query.shape[-1]
    if impl != "einsum":
        if dropout_rate > 0 and dropout_rng is not None:
            raise ValueError(f"attention_impl={impl!r} has no attention dropout; use 'einsum'")
        out = jax.nn.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            is_causal=causal,
            implementation=None if impl == "xla" else impl,
        )
        return out, None
    # sec. 3.2.1: scale by 1/sqrt(d_k) so the softmax does not saturate for large d_k. Scaling q
    # first costs b*t*n*h multiplies instead of b*n*t*s.
    query = query / jnp.sqrt(depth).astype(query.dtype)
    b, t, n, _ = query.shape
    s, k = key.shape[1], key.shape[2]
    if n % k:
        raise ValueError(f"{n} query heads do not divide into groups over {k} key/value heads")
    if k == n:
        scores = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32)
    else:  # each key/value head serves a group of n / k consecutive query heads
        grouped = query.reshape(b, t, k, n // k, depth)
        scores = jnp.einsum("btkgh,bskh->bkgts", grouped, key, preferred_element_type=jnp.float32)
        scores = scores.reshape(b, n, t, s)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)  # [b, n, t, s], float32
    if dropout_rate > 0 and dropout_rng is not None:
        weights = dropout(weights, dropout_rate, dropout_rng)
    if k == n:
        out = jnp.einsum("bnts,bsnh->btnh", weights.astype(value.dtype), value)
    else:
        grouped_weights = weights.astype(value.dtype).reshape(b, k, n // k, t, s)
        out = jnp.einsum("bkgts,bskh->btkgh", grouped_weights, value).reshape(b, t, n, depth)
    return out, weights


def self_attention_reference(qkv: Array, mask: Array | None, causal: bool = False) -> Array:
    """`self_attention`'s plain formula, differentiated by JAX: `dot_product_attention` over
    qkv [b, t, 3, n, h]. `causal` is accepted for the same signature; the mask already hides
    what it would skip."""
    del causal
    return dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)[0]


def query_blocks(length: int, causal: bool) -> list[tuple[int, int, int]]:
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
    for start, end, keys in query_blocks(q.shape[2], causal):
        block_mask = _mask_block(mask, start, end, keys)
        out, exp, inv_sum = _attend_forward(
            q[:, :, start:end], k[:, :, :keys], v[:, :, :keys], block_mask
        )
        outs.append(out)
        saved.append((block_mask, exp, inv_sum))
    out = jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0]  # [b, n, t, h]
    return out.transpose(0, 2, 1, 3), (qkv, tuple(saved), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def self_attention(qkv: Array, mask: Array | None, causal: bool) -> Array:
    """Attention output [b, t, n, h] from fused projections qkv [b, t, 3, n, h]: the result of
    `self_attention_reference` for every query that sees a key.

    The backward pass is written by hand because autodiff of the formula saves the normalised
    [b, n, t, s] weights and takes more passes over them; this one keeps the unnormalised
    exponentials, uses FlashAttention's rowsum(dO * O) identity and chooses layouts that XLA's
    CPU backend multiplies without copying. `causal` promises that `mask` hides every key after
    its query (it may hide more), so the block of later keys for earlier queries is skipped
    (`query_blocks`).

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
        query_blocks(length, causal), saved, strict=True
    ):
        rows = slice(start, end)
        d_v = _batched_matmul(
            d_out_t[..., rows] * inv_sum.swapaxes(2, 3).astype(dtype), exp.astype(dtype), 3, 2
        )  # [b, n, h, keys]
        d_weights = _batched_matmul(d_out_h[:, :, rows], v[:, :, :keys], 3, 3, jnp.float32)
        d_scores = exp * inv_sum * (d_weights - row[:, :, rows])  # [b, n, end - start, keys]
        if mask is not None:  # masked scores are constants: no gradient (all-masked rows too)
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


self_attention.defvjp(_self_attention_forward, _self_attention_backward)


def _batched_matmul(a: Array, b: Array, a_axis: int, b_axis: int, dtype: Any = None) -> Array:
    """Product over batch axes (0, 1) contracting a's `a_axis` with b's `b_axis`."""
    dims = (((a_axis,), (b_axis,)), ((0, 1), (0, 1)))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=dtype)
