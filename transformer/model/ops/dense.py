"""The projection x . W with a hand-written backward pass. Shapes use the legend at the top of
`transformer/model/layers.py`."""

from __future__ import annotations

import functools

import jax
import numpy as np

Array = jax.Array


def matmul_reference(x: Array, kernel: Array, n_in: int) -> Array:
    """x [..., *in] . W [*in, *out], contracting x's last `n_in` axes with W's first; JAX
    differentiates it."""
    lead = x.ndim - n_in
    contract = (tuple(range(lead, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: Array, kernel: Array, n_in: int) -> Array:
    """x [..., *in] . W [*in, *out] as `matmul_reference`, with a hand-written backward pass:
    the weight gradient is one matrix product over the flattened batch x length rows, which
    XLA's CPU backend runs without first copying an operand into a transposed layout."""
    return matmul_reference(x, kernel, n_in)


def _matmul_forward(x: Array, kernel: Array, n_in: int) -> tuple[Array, tuple[Array, Array]]:
    return matmul(x, kernel, n_in), (x, kernel)


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


matmul.defvjp(_matmul_forward, _matmul_backward)
