"""Token and position embeddings, and the tied pre-softmax projection (sec. 3.4, 3.5). Shapes use
the legend at the top of `transformer/model/layers.py`."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer.model.config import ModelConfig
from transformer.model.layers import RESIDUAL_AXES, Dropout, with_axes

Array = jax.Array


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (sec. 3.5)."""
    position = np.arange(max_len, dtype=np.float64)[:, None]
    inv_freq = np.exp(-np.log(10000.0) * np.arange(0, d_model, 2) / d_model)
    table = np.zeros((max_len, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(position * inv_freq)
    table[:, 1::2] = np.cos(position * inv_freq)
    return table.astype(np.float32)


class Embed(nn.Module):
    """Token embedding (x sqrt(d_model) in the paper, sec. 3.4) plus positions (absolute ones:
    rotary positions act in attention), then dropout;
    `attend` is the tied pre-softmax projection that reuses the same matrix (sec. 3.4)."""

    config: ModelConfig

    def setup(self) -> None:
        cfg = self.config
        std = cfg.init_std if cfg.init_std > 0 else cfg.d_model**-0.5
        self.token_embedding = self.param(
            "token_embedding",
            with_axes(nn.initializers.normal(std), "vocab", "embed"),
            (cfg.vocab_size, cfg.d_model),
            cfg.params_dtype,
        )
        if cfg.positions == "learned":
            self.position_embedding = self.param(
                "position_embedding",
                with_axes(nn.initializers.normal(cfg.init_std or 0.02), None, "embed"),
                (cfg.max_len, cfg.d_model),
                cfg.params_dtype,
            )
        self.dropout = Dropout(cfg.dropout_rate)

    def __call__(self, tokens: Array, positions: Array, deterministic: bool = True) -> Array:
        cfg = self.config
        # The tables whole along d_model (under FSDP, gathered as any weight is before use): a
        # lookup into a table split along d_model gives rows split along d_model, which the
        # partitioner cannot turn into the batch-split activations without replicating them.
        table = nn.with_logical_constraint(self.token_embedding, ("vocab", None))
        x = jnp.take(table, tokens, axis=0)  # [b, t, d]
        if cfg.scale_embeddings:
            x = x * np.sqrt(cfg.d_model)
        if cfg.positions == "learned":
            table = nn.with_logical_constraint(self.position_embedding, (None, None))
            x = x + jnp.take(table, positions, axis=0)
        elif cfg.positions == "sinusoidal":
            x = x + jnp.asarray(sinusoidal_table(cfg.max_len, cfg.d_model))[positions]
        # 'rope': positions rotate queries and keys inside attention instead (`ops.apply_rotary`)
        x = self.dropout(x, deterministic=deterministic)
        return nn.with_logical_constraint(x.astype(cfg.compute_dtype), RESIDUAL_AXES)

    def attend(self, x: Array, dtype: Any = jnp.float32) -> Array:
        """Logits x E^T, returned in `dtype` (float32 accumulation either way)."""
        embedding = self.token_embedding.astype(self.config.compute_dtype)
        return jnp.einsum("btd,vd->btv", x, embedding, preferred_element_type=dtype)
