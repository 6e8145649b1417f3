"""Parameter trees of scanned and unrolled decoders, converted both ways.

A model with `scan_layers=True` keeps its decoder layers as one `decoder/layers` subtree whose
arrays have a leading layer axis; with `scan_layers=False` each layer is its own
`decoder/layers_{i}`. The functions here turn one layout into the other, so parameters saved by
either kind of model load into the other.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np

Params = dict[str, Any]


def stack_layers(params: Params) -> Params:
    """Unrolled `decoder/layers_{i}` -> scanned `decoder/layers` with a leading layer axis."""
    decoder = dict(params["decoder"])
    count = sum(1 for k in decoder if re.fullmatch(r"layers_\d+", k))
    layers = [decoder.pop(f"layers_{i}") for i in range(count)]
    decoder["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return {**params, "decoder": decoder}


def unstack_layers(params: Params) -> Params:
    """Scanned `decoder/layers` (leading layer axis) -> unrolled `decoder/layers_{i}`."""
    decoder = dict(params["decoder"])
    stacked = decoder.pop("layers")
    for i in range(jax.tree.leaves(stacked)[0].shape[0]):
        decoder[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "decoder": decoder}
