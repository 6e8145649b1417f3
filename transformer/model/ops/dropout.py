"""Dropout from 16 random bits per element: half the random-number work of `jax.random.bernoulli`,
which draws a 32-bit word per element (threefry hashing is a visible part of a GPU step).

Each 32-bit word gives two 16-bit numbers; an element is kept when its number is below
round(keep * 65536). The keep rate is then a multiple of 1/65536, at most 2^-17 away from the
one asked for, and kept elements are scaled by the reciprocal of that rate, so the output's
expectation is exactly the input. Shapes use the legend at the top of `transformer/model/layers.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

LEVELS = 1 << 16  # values of a 16-bit number


def keep_threshold(keep_prob: float) -> int:
    """The 16-bit threshold of a keep probability: keep when bits < threshold."""
    return int(round(keep_prob * LEVELS))


def keep_mask(key: Array, keep_prob: float, shape: tuple[int, ...]) -> Array:
    """Boolean [*shape], True with probability `keep_threshold(keep_prob) / 65536` each.

    The words are drawn over the same leading axes as `shape` (the last one halved), so a batch
    split over devices draws its bits where its rows live."""
    *lead, last = shape
    words = jax.random.bits(key, (*lead, (last + 1) // 2), jnp.uint32)
    halves = jnp.concatenate([words & 0xFFFF, words >> 16], axis=-1)[..., :last]
    return halves < keep_threshold(keep_prob)


def dropout(x: Array, rate: float, key: Array) -> Array:
    """x with each element zeroed with probability `rate` and the rest scaled to keep its
    expectation (Srivastava et al. 2014; the paper's P_drop, sec. 5.4)."""
    if rate <= 0.0:
        return x
    threshold = keep_threshold(1.0 - rate)
    if threshold == 0:
        return jnp.zeros_like(x)
    with jax.named_scope("dropout"):
        keep = keep_mask(key, 1.0 - rate, x.shape)
        return jnp.where(keep, x * jnp.asarray(LEVELS / threshold, x.dtype), jnp.zeros_like(x))
