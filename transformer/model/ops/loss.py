"""The loss: label-smoothed cross-entropy over the real classes, from logits or, a chunk of
positions at a time, from the last hidden states.

`cross_entropy` returns sums (loss, nll, weight) so means stay right under padding,
micro-batching and several hosts. `chunked_cross_entropy` computes the output projection and the
loss `chunk_len` positions at a time, so the full [b, t, v] float32 logits never exist (GPT-2
small at 16 x 1024 tokens: 3.3 GB of logits, and as much again for their gradient): each chunk's
logits are turned into sums and dropped, and under `jax.checkpoint` the backward pass recomputes
them chunk by chunk. It equals `cross_entropy` of the full logits up to summation order.
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
    """(smoothed loss sum, nll sum, weight sum), as `cross_entropy`.

    project(project_params, h [b, c, d]) -> logits [b, c, v] (float32): the output projection.
    hidden [b, t, d], targets and weights [b, t]. The sequence is cut into chunks of
    `chunk_len` positions (the last padded with weight 0); every row of the batch stays in each
    chunk, so a batch split over devices stays split.
    """
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


def mask_vocab_padding(logits: Array, num_classes: int | None) -> Array:
    """Logits of ids >= `num_classes` (embedding rows that pad the vocabulary) set to the most
    negative float: never predicted, never sampled."""
    if num_classes is None or num_classes >= logits.shape[-1]:
        return logits
    real = jnp.arange(logits.shape[-1]) < num_classes
    return jnp.where(real, logits, jnp.finfo(logits.dtype).min)


def cross_entropy(
    logits: Array,
    targets: Array,
    weights: Array,
    *,
    label_smoothing: float = 0.0,
    num_classes: int | None = None,
) -> tuple[Array, Array, Array]:
    """Label-smoothed cross-entropy, returning sums so means stay right under padding,
    micro-batching and several hosts: (smoothed_loss_sum, nll_sum, weight_sum).

    logits [b, t, v] (float32), targets [b, t], weights [b, t] (0 for padding). Logits of ids
    >= `num_classes` (vocabulary padding) are excluded. Smoothing puts 1 - eps on the target and
    eps / (K - 1) on every other real class (sec. 5.4, eps = 0.1 in the paper).
    """
    logits = mask_vocab_padding(logits.astype(jnp.float32), num_classes)
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing > 0:
        off = label_smoothing / (num_classes - 1)
        others = -log_probs[..., :num_classes].sum(-1) - nll  # sum of -log p over non-targets
        loss = (1.0 - label_smoothing) * nll + off * others
    else:
        loss = nll
    weights = weights.astype(jnp.float32)
    return (loss * weights).sum(), (nll * weights).sum(), weights.sum()
