"""The two models, built from the same layers: the paper's `EncoderDecoder` and the `GPT`.

    logits = GPT(cfg).apply({'params': params}, tokens)                       # [b, t, v]
    logits = EncoderDecoder(cfg).apply({'params': params}, src, tgt_in)       # [b, t, v]

Segment ids mark padding and packing: 0 is padding, 1, 2, ... number the sequences packed into
one row; tokens attend only within their own segment. Without segment ids every token is real.
Positions default to 0..t-1 and must restart per segment when rows are packed.

Cached decoding goes through `decode` in both models, with a `cache_index`: the
caller owns the position bookkeeping and passes explicit masks over the cache buffer
(`transformer.inference` does this for both models).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer.model.blocks import Stack
from transformer.model.config import ModelConfig
from transformer.model.embeddings import Embed
from transformer.model.layers import causal_mask, segment_mask, with_axes

Array = jax.Array


def default_positions(tokens: Array) -> Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def _check_length(cfg: ModelConfig, length: int, what: str) -> None:
    if length > cfg.max_len:
        raise ValueError(
            f"{what} has length {length} > model.max_len={cfg.max_len}; shorten it or raise max_len"
        )


class _OutputHead(nn.Module):
    """Untied pre-softmax projection (used when `tie_embeddings=False`)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, dtype: Any = jnp.float32) -> Array:
        cfg = self.config
        kernel = self.param(
            "kernel",
            with_axes(nn.initializers.normal(cfg.init_std or cfg.d_model**-0.5), "embed", "vocab"),
            (cfg.d_model, cfg.vocab_size),
            cfg.params_dtype,
        )
        return jnp.einsum(
            "btd,dv->btv", x, kernel.astype(cfg.compute_dtype), preferred_element_type=dtype
        )


class _LanguageModel(nn.Module):
    """What both models share: the token embedding and the pre-softmax projection, which is the
    embedding matrix transposed when tied (sec. 3.4) and an `lm_head` of its own otherwise."""

    config: ModelConfig

    def _setup_embeddings(self) -> None:
        self.embed = Embed(self.config)
        if not self.config.tie_embeddings:
            self.lm_head = _OutputHead(self.config)

    def logits(self, x: Array, dtype: Any = jnp.float32) -> Array:
        """The pre-softmax projection: hidden states [b, t, d] -> logits [b, t, v] in `dtype`
        (float32 by default; the loss takes them in the compute dtype)."""
        return self.embed.attend(x, dtype) if self.config.tie_embeddings else self.lm_head(x, dtype)


class GPT(_LanguageModel):
    """Decoder-only Transformer (GPT-2): a causal decoder stack without cross-attention."""

    def setup(self) -> None:
        cfg = self.config
        if not cfg.is_decoder_only:
            raise ValueError("GPT needs model.num_encoder_layers=0; use EncoderDecoder otherwise")
        self._setup_embeddings()
        self.decoder = Stack(cfg, cfg.num_decoder_layers, causal=True)

    def __call__(
        self,
        tokens: Array,
        *,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
    ) -> Array:
        """tokens [b, t] -> logits [b, t, v] (float32), or with `return_hidden` the last hidden
        states [b, t, d] (`logits` projects them; the chunked loss does so a chunk at a time)."""
        _check_length(self.config, tokens.shape[1], "the token sequence")
        positions = default_positions(tokens) if positions is None else positions
        mask = causal_mask(tokens.shape[1])
        if segment_ids is not None:
            mask = mask & segment_mask(segment_ids, segment_ids)
        x = self.decoder(
            self.embed(tokens, positions, deterministic),
            mask,
            deterministic=deterministic,
            positions=positions,
        )
        return x if return_hidden else self.logits(x)

    def decode(self, tokens: Array, positions: Array, mask: Array, cache_index: Array) -> Array:
        """Cached decoding: appends tokens [b, t] at cache slots [cache_index, cache_index + t).

        mask [b, 1, t, s] covers the whole cache buffer (s slots); returns logits [b, t, v].
        """
        x = self.embed(tokens, positions, True)
        return self.logits(self.decoder(x, mask, cache_index=cache_index, positions=positions))


class EncoderDecoder(_LanguageModel):
    """The paper's model (Figure 1): encoder, decoder with masked self-attention and
    cross-attention, one embedding shared by source, target and the output projection."""

    def setup(self) -> None:
        cfg = self.config
        if cfg.is_decoder_only:
            raise ValueError("EncoderDecoder needs model.num_encoder_layers > 0; use GPT otherwise")
        self._setup_embeddings()
        self.encoder = Stack(cfg, cfg.num_encoder_layers)
        self.decoder = Stack(cfg, cfg.num_decoder_layers, cross=True, causal=True)

    def encode(
        self,
        src: Array,
        *,
        src_segment_ids: Array | None = None,
        src_positions: Array | None = None,
        deterministic: bool = True,
    ) -> Array:
        """src [b, s] -> encoder output [b, s, d]."""
        _check_length(self.config, src.shape[1], "the source sequence")
        positions = default_positions(src) if src_positions is None else src_positions
        mask = None if src_segment_ids is None else segment_mask(src_segment_ids, src_segment_ids)
        x = self.embed(src, positions, deterministic)
        return self.encoder(x, mask, deterministic=deterministic, positions=positions)

    def decode(
        self,
        tgt: Array,
        encoded: Array | None,
        *,
        src_segment_ids: Array | None = None,
        tgt_segment_ids: Array | None = None,
        tgt_positions: Array | None = None,
        self_mask: Array | None = None,
        cache_index: Array | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
    ) -> Array:
        """tgt [b, t] (shifted right, starting with BOS) -> logits [b, t, v] (or with
        `return_hidden` the last hidden states [b, t, d]).

        For decoding pass `cache_index`, explicit `tgt_positions` and a `self_mask` over the
        cache buffer; `encoded` may be None once a call has stored the cross-attention keys.
        Without `cache_index`, a given `self_mask` is combined with the causal mask: the
        decoder never sees later target positions.
        """
        if cache_index is None:
            _check_length(self.config, tgt.shape[1], "the target sequence")
        positions = default_positions(tgt) if tgt_positions is None else tgt_positions
        if self_mask is None:
            self_mask = causal_mask(tgt.shape[1])
            if tgt_segment_ids is not None:
                self_mask = self_mask & segment_mask(tgt_segment_ids, tgt_segment_ids)
        elif cache_index is None:  # the decoder stack relies on it (Stack.causal)
            self_mask = self_mask & causal_mask(tgt.shape[1])
        cross_mask = None
        if src_segment_ids is not None:
            queries = (
                tgt_segment_ids
                if tgt_segment_ids is not None
                else jnp.ones(tgt.shape, src_segment_ids.dtype)
            )
            if cache_index is not None:  # decoding one sequence per row: segment 1 throughout
                queries = jnp.ones(tgt.shape, src_segment_ids.dtype)
            cross_mask = segment_mask(queries, src_segment_ids)
        x = self.embed(tgt, positions, deterministic)
        x = self.decoder(x, self_mask, encoded, cross_mask, cache_index, deterministic, positions)
        return x if return_hidden else self.logits(x)

    def __call__(
        self,
        src: Array,
        tgt_in: Array,
        *,
        src_segment_ids: Array | None = None,
        tgt_segment_ids: Array | None = None,
        src_positions: Array | None = None,
        tgt_positions: Array | None = None,
        deterministic: bool = True,
        return_hidden: bool = False,
    ) -> Array:
        """Teacher-forced forward pass: src [b, s], tgt_in [b, t] -> logits [b, t, v] (or the
        last hidden states [b, t, d] with `return_hidden`)."""
        encoded = self.encode(
            src,
            src_segment_ids=src_segment_ids,
            src_positions=src_positions,
            deterministic=deterministic,
        )
        return self.decode(
            tgt_in,
            encoded,
            src_segment_ids=src_segment_ids,
            tgt_segment_ids=tgt_segment_ids,
            tgt_positions=tgt_positions,
            deterministic=deterministic,
            return_hidden=return_hidden,
        )


def model_for(cfg: ModelConfig) -> GPT | EncoderDecoder:
    """The model a config describes: a GPT when it has no encoder, else the encoder-decoder."""
    return GPT(cfg) if cfg.is_decoder_only else EncoderDecoder(cfg)


def init_variables(cfg: ModelConfig, rng: Array) -> dict:
    """The variables of `model_for(cfg)` from a key (parameters boxed with their logical axes):
    shapes do not depend on the example inputs' length."""
    example = jnp.zeros((1, 8), jnp.int32)
    inputs = (example,) if cfg.is_decoder_only else (example, example)
    return model_for(cfg).init(rng, *inputs)
