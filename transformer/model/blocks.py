"""Residual blocks and layer stacks: the encoder and decoder of Figure 1, and GPT's decoder.
Shapes use the legend at the top of `transformer/model/layers.py`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from transformer.model.attention import MultiHeadAttention
from transformer.model.config import ModelConfig
from transformer.model.layers import RESIDUAL_AXES, Dropout, FeedForward, make_norm

Array = jax.Array


class TransformerBlock(nn.Module):
    """One encoder or decoder layer: self-attention, optional cross-attention, FFN, each wrapped
    in a residual connection with dropout and normalisation.

    post-norm (sec. 3.1, 5.4): x = LayerNorm(x + Dropout(Sublayer(x)))
    pre-norm (GPT-2):          x = x + Dropout(Sublayer(LayerNorm(x)))
    """

    config: ModelConfig
    cross: bool = False
    deterministic: bool = True
    out_scale: float = 1.0
    scanned: bool = False  # nn.scan wants (carry, output) back
    causal: bool = False  # the self-attention mask always hides later positions

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        memory: Array | None,
        memory_mask: Array | None,
        cache_index: Array | None,
        positions: Array | None = None,
    ) -> Any:
        cfg = self.config

        def residual(y: Array, sublayer: Callable[[Array], Array], norm_name: str) -> Array:
            norm = make_norm(cfg, norm_name)
            drop = Dropout(cfg.dropout_rate, deterministic=self.deterministic)
            if cfg.norm_position == "pre":
                return y + drop(sublayer(norm(y)))
            return norm(y + drop(sublayer(y)))

        attention = functools.partial(
            MultiHeadAttention, cfg, deterministic=self.deterministic, out_scale=self.out_scale
        )
        x = residual(
            x,
            lambda y: attention(causal=self.causal, name="self_attention")(
                y, mask, None, cache_index, positions
            ),
            "norm_self_attention",
        )
        if self.cross:
            x = residual(
                x,
                lambda y: attention(cross=True, name="cross_attention")(
                    y, memory_mask, memory, cache_index
                ),
                "norm_cross_attention",
            )
        x = residual(
            x,
            FeedForward(cfg, self.out_scale, self.deterministic, name="mlp"),
            "norm_mlp",
        )
        x = nn.with_logical_constraint(x, RESIDUAL_AXES)
        return (x, None) if self.scanned else x


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Stack(nn.Module):
    """`num_layers` blocks (unrolled, or one block under `nn.scan`), then a final norm when the
    blocks are pre-norm (GPT-2's ln_f: pre-norm leaves the residual stream unnormalised)."""

    config: ModelConfig
    num_layers: int
    cross: bool = False
    # A decoder: every self-attention mask it is given hides later positions (the caller's
    # mask may hide more), which lets training skip the fully masked half of attention.
    causal: bool = False

    @nn.compact
    def __call__(
        self,
        x: Array,
        mask: Array | None,
        memory: Array | None = None,
        memory_mask: Array | None = None,
        cache_index: Array | None = None,
        deterministic: bool = True,
        positions: Array | None = None,  # [b, t], for rotary positions
    ) -> Array:
        cfg = self.config
        block: Any = TransformerBlock
        if cfg.remat_policy != "none":
            block = nn.remat(
                block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers
            )
        # GPT-2: residual projections scaled by 1/sqrt(number of residual additions).
        out_scale = 1.0 / np.sqrt((3 if self.cross else 2) * self.num_layers)
        kwargs = dict(
            cross=self.cross, deterministic=deterministic, out_scale=out_scale, causal=self.causal
        )
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 5,
                length=self.num_layers,
                unroll=min(cfg.scan_unroll, self.num_layers),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(cfg, scanned=True, name="layers", **kwargs)(
                x, mask, memory, memory_mask, cache_index, positions
            )
        else:
            for i in range(self.num_layers):
                x = block(cfg, name=f"layers_{i}", **kwargs)(
                    x, mask, memory, memory_mask, cache_index, positions
                )
        if cfg.norm_position == "pre":
            x = make_norm(cfg, "final_norm")(x)
        return x
