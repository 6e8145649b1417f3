"""Cross-entropy from the last hidden states, the output projection a chunk of positions at a
time, so the full [b, t, v] float32 logits never exist (GPT-2 small at 16 x 1024 tokens: 3.3 GB
of logits, and as much again for their gradient).

Each chunk's logits are computed, turned into loss sums and dropped; under `jax.checkpoint`
the backward pass recomputes them chunk by chunk. The result equals
`transformer.optim.cross_entropy` of the full logits up to float summation order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def chunked_cross_entropy(
    project: Callable[[Any, Array], Array],
    project_params: Any,
    hidden: Array,
    targets: Array,
    weights: Array,
    *,
    chunk_len: int,
    label_smoothing: float = 0.0,
    num_classes: int | None = None,
) -> tuple[Array, Array, Array]:
    """(smoothed loss sum, nll sum, weight sum), as `optim.cross_entropy`.

    project(project_params, h [b, c, d]) -> logits [b, c, v] (float32): the output projection.
    hidden [b, t, d], targets and weights [b, t]. The sequence is cut into chunks of
    `chunk_len` positions (the last padded with weight 0); every row of the batch stays in each
    chunk, so a batch split over devices stays split.
    """
    from transformer.optim import cross_entropy

    b, t, d = hidden.shape
    chunk_len = max(1, min(chunk_len, t))
    pad = -t % chunk_len
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))
    n = (t + pad) // chunk_len

    def chunks(x: Array) -> Array:  # [b, n * c, ...] -> [n, b, c, ...]
        return x.reshape(b, n, chunk_len, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_loss(params: Any, h: Array, tgt: Array, w: Array) -> tuple[Array, Array, Array]:
        logits = project(params, h)  # [b, c, v], dropped after the sums
        return cross_entropy(
            logits, tgt, w, label_smoothing=label_smoothing, num_classes=num_classes
        )

    def body(totals: tuple[Array, ...], xs: tuple[Array, ...]) -> tuple[tuple[Array, ...], None]:
        sums = chunk_loss(project_params, *xs)
        return tuple(a + s for a, s in zip(totals, sums, strict=True)), None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(
        body, (zero, zero, zero), (chunks(hidden), chunks(targets), chunks(weights))
    )
    return totals
