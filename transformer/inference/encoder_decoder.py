"""Translating with an encoder-decoder: the decoding callback over its caches, `translate` (beam
search, the paper's settings) and `bleu`.

The source is encoded once; every decoder layer's cross-attention keys and values are stored in
the cache by a first BOS step, and the self-attention cache fills one slot per generated token.
`transformer.inference.decode.beam_search` runs over the callback.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import sacrebleu

from transformer.errors import ConfigError
from transformer.inference.decode import beam_search, until_eos
from transformer.model.config import ModelConfig
from transformer.model.models import EncoderDecoder
from transformer.model.ops import mask_vocab_padding

Array = jax.Array


def encdec_init_cache(
    cfg: ModelConfig, params: Any, src: Array, src_segment_ids: Array, length: int, bos_id: int
) -> dict[str, Any]:
    """Encodes the source once and stores every layer's cross-attention keys and values."""
    model = EncoderDecoder(cfg)
    b = src.shape[0]
    encoded = model.apply(
        {"params": params}, src, src_segment_ids=src_segment_ids, method=EncoderDecoder.encode
    )
    tgt = jnp.zeros((b, length), jnp.int32)
    self_mask = jnp.ones((b, 1, length, length), bool)
    shapes = jax.eval_shape(
        lambda: model.init(
            jax.random.key(0),
            tgt,
            encoded,
            src_segment_ids=src_segment_ids,
            self_mask=self_mask,
            cache_index=0,
            method=EncoderDecoder.decode,
        )["cache"]
    )
    kv = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    # One BOS step fills the cross-attention keys/values; the slot-0 self-attention entries it
    # writes are the same the first real (BOS) step writes again.
    bos = jnp.full((b, 1), bos_id, jnp.int32)
    _, variables = model.apply(
        {"params": params, "cache": kv},
        bos,
        encoded,
        src_segment_ids=src_segment_ids,
        tgt_positions=jnp.zeros((b, 1), jnp.int32),
        self_mask=jnp.ones((b, 1, 1, length), bool),
        cache_index=jnp.zeros((), jnp.int32),
        method=EncoderDecoder.decode,
        mutable=["cache"],
    )
    return {
        "kv": variables["cache"],
        "index": jnp.zeros((), jnp.int32),
        "src_segment_ids": src_segment_ids,
    }


def encdec_tokens_to_logits(cfg: ModelConfig, params: Any) -> Any:
    """The decoding callback of an encoder-decoder with these parameters over a cache from
    `encdec_init_cache`: logits of the new target tokens, the padded vocabulary rows masked."""
    model = EncoderDecoder(cfg)

    def tokens_to_logits(tokens: Array, cache: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
        b, t = tokens.shape
        index = cache["index"]
        columns = index + jnp.arange(t)
        key_slots = jnp.arange(_self_cache_length(cache))
        mask = key_slots[None, None, None, :] <= columns[None, None, :, None]
        mask = jnp.broadcast_to(mask, (b, 1, t, key_slots.shape[0]))
        logits, variables = model.apply(
            {"params": params, "cache": cache["kv"]},
            tokens,
            None,
            src_segment_ids=cache["src_segment_ids"],
            tgt_positions=jnp.broadcast_to(columns[None, :], (b, t)),
            self_mask=mask,
            cache_index=index,
            method=EncoderDecoder.decode,
            mutable=["cache"],
        )
        new_cache = {**cache, "kv": variables["cache"], "index": index + t}
        return mask_vocab_padding(logits, cfg.num_classes), new_cache

    return tokens_to_logits


def _self_cache_length(cache: dict[str, Any]) -> int:
    """Slots of the decoder's self-attention buffers (not the cross-attention ones)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache["kv"]):
        if getattr(path[-1], "key", None) == "key":
            return leaf.shape[-3]
    raise ValueError("the cache holds no self-attention buffers")


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "length", "bos_id", "eos_id", "beam_size", "alpha"),
)
def _translate_ids(
    params: Any,
    src: Array,
    src_segment_ids: Array,
    *,
    cfg: ModelConfig,
    length: int,
    bos_id: int,
    eos_id: int,
    beam_size: int,
    alpha: float,
) -> Array:
    cache = encdec_init_cache(cfg, params, src, src_segment_ids, length, bos_id)
    sequences, _ = beam_search(
        encdec_tokens_to_logits(cfg, params),
        cache,
        batch_size=src.shape[0],
        bos_id=bos_id,
        eos_id=eos_id,
        beam_size=beam_size,
        alpha=alpha,
        max_len=length,
    )
    return sequences[:, 0]  # the best hypothesis of each example


def translate(
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any,
    sentences: list[str],
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
    extra_length: int = 50,
    batch_size: int = 32,
) -> list[str]:
    """Beam search (the paper: beam 4, alpha 0.6, at most input length + 50 tokens, sec. 6.1).

    beam_size 1 is greedy decoding. Sources longer than the model's context are cut to fit.
    """
    if cfg.is_decoder_only:
        raise ConfigError("translate() needs an encoder-decoder run; use generate() for a GPT")
    if beam_size < 1:
        raise ConfigError(f"beam_size={beam_size} must be at least 1")
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    results: list[str] = []
    for start in range(0, len(sentences), batch_size):
        chunk = [
            (tokenizer.encode(s) + [eos])[: cfg.max_len]
            for s in sentences[start : start + batch_size]
        ]
        width = -(-max(len(ids) for ids in chunk) // 8) * 8  # round up: fewer recompilations
        width = min(width, cfg.max_len)
        src = np.zeros((len(chunk), width), np.int32)
        segments = np.zeros((len(chunk), width), np.int32)
        for row, ids in enumerate(chunk):
            src[row, : len(ids)] = ids
            segments[row, : len(ids)] = 1
        out = _translate_ids(
            params,
            jnp.asarray(src),
            jnp.asarray(segments),
            cfg=cfg,
            length=min(width + extra_length, cfg.max_len),
            bos_id=bos,
            eos_id=eos,
            beam_size=beam_size,
            alpha=float(alpha),
        )
        results += [tokenizer.decode(until_eos(row, eos)) for row in np.asarray(out).tolist()]
    return results


def bleu(
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    *,
    beam_size: int = 4,
    alpha: float = 0.6,
) -> tuple[float, list[str]]:
    """Corpus BLEU (sacrebleu, its default 13a tokenisation) of translations of `pairs`."""
    hypotheses = translate(
        cfg, params, tokenizer, [src for src, _ in pairs], beam_size=beam_size, alpha=alpha
    )
    score = sacrebleu.corpus_bleu(hypotheses, [[tgt for _, tgt in pairs]]).score
    return float(score), hypotheses
