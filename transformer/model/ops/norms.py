"""Layer normalisation and RMS normalisation with hand-written backward passes. Shapes use the
legend at the top of `transformer/model/layers.py`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def layer_norm_reference(x: Array, scale: Array, bias: Array | None, epsilon: float) -> Array:
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32 (the result
    too); JAX differentiates it."""
    return _layer_norm_forward(x, scale, bias, epsilon)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array | None, epsilon: float) -> Array:
    """`layer_norm_reference` with a hand-written backward pass: the closed-form gradient takes
    two passes over [b, t, d] where autodiff of the two-pass variance takes more (and on CPU
    materialises the scale broadcast to [b, t, d] for each of them)."""
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
    x, mean, rstd, scale, bias = residuals
    dy = dy.astype(jnp.float32)
    normed = (x.astype(jnp.float32) - mean) * rstd
    rows = tuple(range(x.ndim - 1))
    d_scale = (dy * normed).sum(rows).astype(scale.dtype)
    d_bias = None if bias is None else dy.sum(rows).astype(bias.dtype)
    g = dy * scale.astype(jnp.float32)
    dx = rstd * (g - g.mean(-1, keepdims=True) - normed * (g * normed).mean(-1, keepdims=True))
    return dx.astype(x.dtype), d_scale, d_bias


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


def rms_norm_reference(x: Array, scale: Array, epsilon: float) -> Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis (Zhang and Sennrich 2019), in
    float32 (the result too); JAX differentiates it."""
    return _rms_norm_forward(x, scale, epsilon)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: Array, scale: Array, epsilon: float) -> Array:
    """`rms_norm_reference` with a hand-written backward pass (the closed form, one pass over
    [b, t, d] for dx), as `layer_norm`."""
    return _rms_norm_forward(x, scale, epsilon)[0]


def _rms_norm_forward(x: Array, scale: Array, epsilon: float) -> tuple[Array, tuple[Array, ...]]:
    x32 = x.astype(jnp.float32)
    rstd = jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + epsilon)
    return x32 * (rstd * scale.astype(jnp.float32)), (x, rstd, scale)


def _rms_norm_backward(
    epsilon: float, residuals: tuple[Array, ...], dy: Array
) -> tuple[Array, Array]:
    # With n = x * rstd and g = dy * scale: dx = rstd * (g - n * mean(g * n)), dscale = sum(dy n).
    x, rstd, scale = residuals
    dy = dy.astype(jnp.float32)
    normed = x.astype(jnp.float32) * rstd
    d_scale = (dy * normed).sum(tuple(range(x.ndim - 1))).astype(scale.dtype)
    g = dy * scale.astype(jnp.float32)
    dx = rstd * (g - normed * (g * normed).mean(-1, keepdims=True))
    return dx.astype(x.dtype), d_scale


rms_norm.defvjp(_rms_norm_forward, _rms_norm_backward)
