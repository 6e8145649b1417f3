"""Rotary position embeddings (RoFormer, Su et al. 2021), as Llama applies them to queries and
keys. Shapes use the legend at the top of `transformer/model/layers.py`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rotary_frequencies(head_dim: int, theta: float) -> Array:
    """theta^(-2i/h) for i < h/2: the angle per position of each rotated pair, float32 [h/2]."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (theta**exponents)


def apply_rotary(x: Array, positions: Array, theta: float, turned: int | None = None) -> Array:
    """Rotates x [b, t, n, h] by its positions [b, t]: each head's dimension pair (j, j + h/2)
    turns by the angle position * theta^(-2j/h), Llama's "rotate half" layout.

    x may also be stacked projections [b, t, p, n, h] of which the first `turned` turn and the
    rest (values) keep angle 0: fused [b, t, 3, n, h] queries, keys and values rotate in one
    elementwise pass and stay fused.

    Rotations compose, so for a query at i and a key at j the score q_i . k_j depends on the
    positions only through i - j (RoFormer eq. 16): a cache at any offset, or a packed row whose
    positions restart per segment, sees the same relative geometry. Angles and products are
    float32; the result has x's dtype."""
    half = x.shape[-1] // 2
    angles = positions.astype(jnp.float32)[..., None] * rotary_frequencies(x.shape[-1], theta)
    angles = jnp.concatenate([angles, angles], axis=-1)  # [b, t, h]
    angles = angles.reshape(*angles.shape[:2], *(1,) * (x.ndim - 3), x.shape[-1])
    cos, sin = jnp.cos(angles), jnp.sin(angles)  # [b, t, 1, h] or [b, t, 1, 1, h]
    if turned is not None:
        turns = (jnp.arange(x.shape[2]) < turned).reshape(1, 1, -1, *(1,) * (x.ndim - 3))
        cos, sin = jnp.where(turns, cos, 1.0), jnp.where(turns, sin, 0.0)
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)
