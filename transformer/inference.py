"""Using a trained run: load `(config, params, tokenizer)` from a workdir and generate.

    from transformer import load_run
    from transformer.inference import generate, translate
    model_cfg, params, tokenizer = load_run("runs/default")
    print(generate(model_cfg, params, tokenizer, ["ROMEO:"], max_new_tokens=100)[0])

The glue here turns each model into the `tokens_to_logits(tokens, cache) -> (logits, cache)`
callback that `transformer.decode` samples and beam-searches over. The cache is
`{'kv': the models' 'cache' collection, 'index': next slot (scalar), ...}`; prompts are
left-padded, so every row writes the same slot each step and `offset` (pads per row) keeps
positions and masks right.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer.config import ConfigError, ModelConfig
from transformer.models import GPT, EncoderDecoder
from transformer.optim import mask_vocab_padding

log = logging.getLogger(__name__)

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# The decoding callbacks.


def gpt_init_cache(cfg: ModelConfig, batch: int, length: int, offset: Array) -> dict[str, Any]:
    """An empty cache of `length` slots for rows left-padded by `offset` [b] tokens."""
    model = GPT(cfg)
    tokens = jnp.zeros((batch, length), jnp.int32)
    mask = jnp.ones((batch, 1, length, length), bool)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), tokens, tokens, mask, 0, method=GPT.decode)["cache"]
    )
    kv = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return {"kv": kv, "index": jnp.zeros((), jnp.int32), "offset": offset.astype(jnp.int32)}


def gpt_tokens_to_logits(cfg: ModelConfig, params: Any, num_classes: int | None = None) -> Any:
    model = GPT(cfg)

    def tokens_to_logits(tokens: Array, cache: dict[str, Any]) -> tuple[Array, dict[str, Any]]:
        b, t = tokens.shape
        index, offset = cache["index"], cache["offset"]
        slots = jax.tree.leaves(cache["kv"])[0].shape[-3]  # buffer length s
        columns = index + jnp.arange(t)  # [t] cache slots written by this call
        positions = jnp.maximum(columns[None, :] - offset[:, None], 0)  # [b, t]
        keys = jnp.arange(slots)
        mask = (keys[None, None, None, :] <= columns[None, None, :, None]) & (
            keys[None, None, None, :] >= offset[:, None, None, None]
        )  # [b, 1, t, s]
        logits, variables = model.apply(
            {"params": params, "cache": cache["kv"]},
            tokens,
            positions,
            mask,
            index,
            method=GPT.decode,
            mutable=["cache"],
        )
        new_cache = {"kv": variables["cache"], "index": index + t, "offset": offset}
        return mask_vocab_padding(logits, num_classes), new_cache

    return tokens_to_logits


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


def encdec_tokens_to_logits(cfg: ModelConfig, params: Any, num_classes: int | None = None) -> Any:
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
        return mask_vocab_padding(logits, num_classes), new_cache

    return tokens_to_logits


def _self_cache_length(cache: dict[str, Any]) -> int:
    """Slots of the decoder's self-attention buffers (not the cross-attention ones)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache["kv"]):
        if getattr(path[-1], "key", None) == "key":
            return leaf.shape[-3]
    raise ValueError("the cache holds no self-attention buffers")


# ---------------------------------------------------------------------------------------------
# Generation and translation, text in, text out.


@functools.partial(
    jax.jit,
    static_argnames=(
        "cfg",
        "num_classes",
        "max_new_tokens",
        "temperature",
        "top_k",
        "top_p",
        "eos_id",
    ),
)
def _generate_ids(
    params: Any,
    prompt: Array,
    offset: Array,
    rng: Array,
    *,
    cfg: ModelConfig,
    num_classes: int | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_id: int | None,
) -> Array:
    from transformer.decode import sample

    cache = gpt_init_cache(cfg, prompt.shape[0], prompt.shape[1] + max_new_tokens, offset)
    return sample(
        gpt_tokens_to_logits(cfg, params, num_classes),
        prompt,
        cache,
        rng,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
    )


def _until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def generate(
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> list[str]:
    """Continues each prompt (a batch, any lengths); returns the generated text only.

    An empty prompt starts from the end-of-text token, which precedes every document in
    training. The prompt must fit the model's context `max_len`; the text may run past it. When
    the context is full, generation goes on from the last `max_len // 2` tokens, fed back as a
    new prompt (nanoGPT crops its context the same way, but at every token; here it happens
    once per half context, so the KV cache does the work in between).
    """
    if not cfg.is_decoder_only:
        raise ConfigError("generate() needs a GPT run; use translate() for an encoder-decoder")
    start = tokenizer.eos_id if tokenizer.eos_id is not None else tokenizer.bos_id
    contexts = [tokenizer.encode(p) or [start] for p in prompts]
    longest = max(len(ids) for ids in contexts)
    if longest >= cfg.max_len:
        raise ConfigError(
            f"the prompt ({longest} tokens) leaves no room in the model's context of "
            f"{cfg.max_len} tokens; shorten it to fewer than {cfg.max_len} tokens"
        )
    eos = tokenizer.eos_id if stop_at_eos else None
    sampling = dict(
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), eos_id=eos
    )
    generated: list[list[int]] = [[] for _ in contexts]
    finished = [max_new_tokens <= 0] * len(contexts)
    key = jax.random.key(seed)
    window = 0
    while not all(finished):
        longest = max(len(ids) for ids in contexts)
        remaining = max(
            max_new_tokens - len(g) for g, f in zip(generated, finished, strict=True) if not f
        )
        # After the first window, always the same size: one compiled loop for all of them.
        steps = min(remaining, cfg.max_len - longest) if window == 0 else cfg.max_len - longest
        window_key = key if window == 0 else jax.random.fold_in(key, window)
        out = _continue(cfg, params, tokenizer, contexts, steps, window_key, **sampling)
        for row, ids in enumerate(out):
            if finished[row]:
                continue
            new = _until_eos(ids, eos)
            generated[row] += new[: max_new_tokens - len(generated[row])]
            finished[row] = len(new) < len(ids) or len(generated[row]) >= max_new_tokens
            contexts[row] = (contexts[row] + new)[-(cfg.max_len // 2) :]
        window += 1
    return [tokenizer.decode(ids) for ids in generated]


def _continue(
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any,
    contexts: list[list[int]],
    steps: int,
    key: Array,
    **sampling: Any,
) -> list[list[int]]:
    """`steps` new token ids per context, the contexts left-padded into one batch."""
    longest = max(len(ids) for ids in contexts)
    prompt = np.zeros((len(contexts), longest), np.int32)
    for row, ids in enumerate(contexts):
        prompt[row, longest - len(ids) :] = ids
    offset = np.asarray([longest - len(ids) for ids in contexts], np.int32)
    out = _generate_ids(
        params,
        jnp.asarray(prompt),
        jnp.asarray(offset),
        key,
        cfg=cfg,
        num_classes=tokenizer.vocab_size,
        max_new_tokens=steps,
        **sampling,
    )
    return np.asarray(out).tolist()


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "num_classes", "length", "bos_id", "eos_id", "beam_size", "alpha"),
)
def _translate_ids(
    params: Any,
    src: Array,
    src_segment_ids: Array,
    *,
    cfg: ModelConfig,
    num_classes: int | None,
    length: int,
    bos_id: int,
    eos_id: int,
    beam_size: int,
    alpha: float,
) -> Array:
    from transformer.decode import beam_search

    cache = encdec_init_cache(cfg, params, src, src_segment_ids, length, bos_id)
    sequences, _ = beam_search(
        encdec_tokens_to_logits(cfg, params, num_classes),
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
            num_classes=tokenizer.vocab_size,
            length=min(width + extra_length, cfg.max_len),
            bos_id=bos,
            eos_id=eos,
            beam_size=beam_size,
            alpha=float(alpha),
        )
        results += [tokenizer.decode(_until_eos(row, eos)) for row in np.asarray(out).tolist()]
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
    import sacrebleu

    hypotheses = translate(
        cfg, params, tokenizer, [src for src, _ in pairs], beam_size=beam_size, alpha=alpha
    )
    score = sacrebleu.corpus_bleu(hypotheses, [[tgt for _, tgt in pairs]]).score
    return float(score), hypotheses
