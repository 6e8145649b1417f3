"""GELU with a hand-written backward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_GELU_C = float(np.sqrt(2.0 / np.pi))


def gelu_reference(u: Array) -> Array:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016, as in GPT-2):
    0.5 u (1 + tanh(sqrt(2 / pi) (u + 0.044715 u^3))); JAX differentiates it."""
    return jax.nn.gelu(u, approximate=True)


@jax.custom_vjp
def gelu(u: Array) -> Array:
    """`gelu_reference` with a hand-written backward pass that recomputes tanh from u in one
    fused pass instead of saving it: one [b, t, f] residual instead of several."""
    return gelu_reference(u)


def _gelu_forward(u: Array) -> tuple[Array, Array]:
    return gelu(u), u


def _gelu_backward(u: Array, dy: Array) -> tuple[Array]:
    x = u.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (x + 0.044715 * x**3))
    slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * x * x)
    return ((dy.astype(jnp.float32) * slope).astype(u.dtype),)


gelu.defvjp(_gelu_forward, _gelu_backward)
