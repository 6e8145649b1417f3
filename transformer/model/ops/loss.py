"""The loss: label-smoothed cross-entropy over the real classes, from logits or, a chunk of
positions at a time, from the last hidden states.

`cross_entropy` returns sums (loss, nll, weight) so means stay right under padding,
micro-batching and several hosts. It takes the logits in the compute dtype (bfloat16 in mixed
precision) and never makes a float32 copy of them: the log-sum-exp and the target's logit are
float32 reductions over the logits as they are, the target is picked by comparing against an
iota (no gather, so no scatter in the backward pass), and the hand-written backward pass writes
`softmax - onehot` once, in the logits' dtype, from the saved logits and the float32
log-sum-exp. `cross_entropy_reference` is the plain formula differentiated by JAX.

`chunked_cross_entropy` computes the output projection and the loss `chunk_len` positions at a
time, so not even the [b, t, v] logits exist at once (GPT-2 small at 16 x 1024 tokens: 1.6 GB of
bfloat16 logits, and as much again for their gradient): each chunk's logits are turned into sums
and dropped, and under `jax.checkpoint` the backward pass recomputes them chunk by chunk. It
equals `cross_entropy` of the full logits up to summation order.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32


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
    loss: Callable[..., tuple[Array, Array, Array]] | None = None,
) -> tuple[Array, Array, Array]:
    """(smoothed loss sum, nll sum, weight sum), as `cross_entropy`.

    project(project_params, h [b, c, d]) -> logits [b, c, v] (any float dtype): the output
    projection.
    hidden [b, t, d], targets and weights [b, t]. The sequence is cut into chunks of
    `chunk_len` positions (the last padded with weight 0); every row of the batch stays in each
    chunk, so a batch split over devices stays split. `loss` is `cross_entropy` (default) or
    `cross_entropy_reference`.
    """
    loss = cross_entropy if loss is None else loss
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
        return loss(logits, tgt, w, label_smoothing=label_smoothing, num_classes=num_classes)

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


def cross_entropy_reference(
    logits: Array,
    targets: Array,
    weights: Array,
    *,
    label_smoothing: float = 0.0,
    num_classes: int | None = None,
) -> tuple[Array, Array, Array]:
    """`cross_entropy`'s formula on float32 logits, differentiated by JAX: the check for the
    hand-written version, and what the loss was before it."""
    logits = mask_vocab_padding(logits.astype(F32), num_classes)
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if label_smoothing > 0:
        off = label_smoothing / (num_classes - 1)
        others = -log_probs[..., :num_classes].sum(-1) - nll  # sum of -log p over non-targets
        loss = (1.0 - label_smoothing) * nll + off * others
    else:
        loss = nll
    weights = weights.astype(F32)
    return (loss * weights).sum(), (nll * weights).sum(), weights.sum()


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

    logits [b, t, v] in any float dtype, targets [b, t], weights [b, t] (0 for padding). Logits
    of ids >= `num_classes` (vocabulary padding) are excluded. Smoothing puts 1 - eps on the
    target and eps / (K - 1) on every other real class (sec. 5.4, eps = 0.1 in the paper).
    Statistics are float32; the gradient has the logits' dtype (see the module docstring).
    """
    num_classes = logits.shape[-1] if num_classes is None else num_classes
    weights = weights.astype(F32)
    return _cross_entropy(logits, targets, weights, float(label_smoothing), int(num_classes))


def _position_losses(
    logits: Array, targets: Array, smoothing: float, num_classes: int
) -> tuple[Array, Array, Array]:
    """(smoothed loss, nll, log-sum-exp), each float32 [b, t]. Every term is a reduction over
    the logits' last axis of an elementwise function of them, which XLA fuses into one pass
    without a float32 [b, t, v] buffer."""
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    real = ids < num_classes
    # Each reduction reads the logits in their own dtype with its own elementwise prologue, so
    # none of them needs a converted copy materialised first (the max is exact in any dtype).
    top = jnp.where(real, logits, jnp.finfo(logits.dtype).min).max(-1).astype(F32)
    exp = jnp.where(real, jnp.exp(logits.astype(F32) - top[..., None]), 0.0)
    lse = top + jnp.log(exp.sum(-1))
    target_logit = jnp.where(ids == targets[..., None], logits, 0).sum(-1, dtype=F32)
    nll = lse - target_logit
    if smoothing == 0:
        return nll, nll, lse
    # sum over real classes of -log p_j = K lse - sum_j x_j; the non-targets' part excludes nll.
    others = num_classes * lse - jnp.where(real, logits, 0).sum(-1, dtype=F32) - nll
    off = smoothing / (num_classes - 1)
    return (1.0 - smoothing) * nll + off * others, nll, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _cross_entropy(
    logits: Array, targets: Array, weights: Array, smoothing: float, num_classes: int
) -> tuple[Array, Array, Array]:
    return _cross_entropy_forward(logits, targets, weights, smoothing, num_classes)[0]


def _cross_entropy_forward(
    logits: Array, targets: Array, weights: Array, smoothing: float, num_classes: int
) -> tuple[tuple[Array, Array, Array], tuple[Array, ...]]:
    loss, nll, lse = _position_losses(logits, targets, smoothing, num_classes)
    sums = ((loss * weights).sum(), (nll * weights).sum(), weights.sum())
    return sums, (logits, targets, weights, lse, loss, nll)


def _cross_entropy_backward(
    smoothing: float, num_classes: int, residuals: tuple[Array, ...], cotangents: tuple
) -> tuple[Array, None, Array]:
    # With p = softmax over the real classes and loss = (1 - eps - off) nll + off sum_j -log p_j
    # (off = eps / (K - 1)): d loss / dx = (1 - eps - off)(p - onehot) + off (K p - 1), and
    # d nll / dx = p - onehot. So with a = w (g_loss (1 - eps - off) + g_nll), c = w g_loss off:
    #   dx = (a + c K) p - a onehot - c   on real classes, 0 on padding.
    logits, targets, weights, lse, loss, nll = residuals
    g_loss, g_nll, g_weight = cotangents
    w = weights
    off = smoothing / (num_classes - 1) if smoothing else 0.0
    a = w * (g_loss * (1.0 - smoothing - off) + g_nll)  # [b, t]
    c = w * (g_loss * off)
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    p = jnp.exp(logits.astype(F32) - lse[..., None])
    d = ((a + c * num_classes)[..., None] * p - c[..., None]) - jnp.where(
        ids == targets[..., None], a[..., None], 0.0
    )
    d_logits = jnp.where(ids < num_classes, d, 0.0).astype(logits.dtype)
    return d_logits, None, g_loss * loss + g_nll * nll + g_weight


_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)
