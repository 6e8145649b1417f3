"""Generating text with a GPT: the decoding callback over its KV cache, and `generate`.

    from transformer import load_run
    from transformer.inference import generate
    model_cfg, params, tokenizer = load_run("runs/default")
    print(generate(model_cfg, params, tokenizer, ["ROMEO:"], max_new_tokens=100)[0])

The glue here turns the model into the `tokens_to_logits(tokens, cache) -> (logits, cache)`
callback that `transformer.inference.decode` samples over. The cache is `{'kv': the model's
'cache' collection, 'index': next slot (scalar), 'offset': pads per row}`; prompts are
left-padded, so every row writes the same slot each step and `offset` keeps positions and masks
right. Padded vocabulary rows (`model.real_vocab_size`) are never sampled.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer.data.chat import ChatFormat, ChatRenderer
from transformer.errors import ConfigError
from transformer.inference.decode import sample_tokens, until_eos
from transformer.model.config import ModelConfig
from transformer.model.models import GPT
from transformer.model.ops import mask_vocab_padding

Array = jax.Array


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


def gpt_tokens_to_logits(cfg: ModelConfig, params: Any) -> Any:
    """The decoding callback of a GPT with these parameters (see `transformer.inference.decode`):
    logits of the new tokens, the padded vocabulary rows masked."""
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
        return mask_vocab_padding(logits, cfg.num_classes), new_cache

    return tokens_to_logits


SAMPLING_ARGS = ("max_new_tokens", "temperature", "top_k", "top_p", "eos_id")  # static


def continue_prompts(
    params: Any,
    prompt: Array,
    offset: Array,
    rng: Array,
    *,
    cfg: ModelConfig,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_id: int | None,
) -> Array:
    """`max_new_tokens` new ids per row of a left-padded prompt [b, t] (`offset` [b]: each
    row's padding), sampled with a KV cache; to be jitted with `cfg` and `SAMPLING_ARGS` static."""
    cache = gpt_init_cache(cfg, prompt.shape[0], prompt.shape[1] + max_new_tokens, offset)
    return sample_tokens(
        gpt_tokens_to_logits(cfg, params),
        prompt,
        cache,
        rng,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=eos_id,
    )


_generate_ids = jax.jit(continue_prompts, static_argnames=("cfg", *SAMPLING_ARGS))


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
    eos = tokenizer.eos_id if stop_at_eos else None
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    generated = generate_ids(cfg, params, contexts, max_new_tokens, eos_id=eos, **sampling)
    return [tokenizer.decode(ids) for ids in generated]


def reply(
    cfg: ModelConfig,
    params: Any,
    tokenizer: Any,
    chat: ChatFormat,
    conversations: list[list[dict[str, str]]],
    *,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """The assistant's next turn in each conversation (lists of {"role", "content"}),
    rendered with the run's chat format; generation stops at the end-of-turn token."""
    if not cfg.is_decoder_only:
        raise ConfigError("reply() needs a GPT run")
    renderer = ChatRenderer(chat)
    contexts = [renderer.prompt_ids(tokenizer, messages) for messages in conversations]
    end = tokenizer.hf.token_to_id(chat.end_of_turn)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    generated = generate_ids(cfg, params, contexts, max_new_tokens, eos_id=end, **sampling)
    return [tokenizer.decode(ids) for ids in generated]


def generate_ids(
    cfg: ModelConfig,
    params: Any,
    contexts: list[list[int]],
    max_new_tokens: int,
    *,
    eos_id: int | None,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[list[int]]:
    """Up to `max_new_tokens` new ids after each context, each row stopping after `eos_id` (not
    included); see `generate` for how a context longer than the model's slides."""
    contexts = [list(ids) for ids in contexts]
    longest = max(len(ids) for ids in contexts)
    if longest >= cfg.max_len:
        raise ConfigError(
            f"the prompt ({longest} tokens) leaves no room in the model's context of "
            f"{cfg.max_len} tokens; shorten it to fewer than {cfg.max_len} tokens"
        )
    sampling = dict(
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), eos_id=eos_id
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
        out = _continue(cfg, params, contexts, steps, window_key, **sampling)
        for row, ids in enumerate(out):
            if finished[row]:
                continue
            new = until_eos(ids, eos_id)
            generated[row] += new[: max_new_tokens - len(generated[row])]
            finished[row] = len(new) < len(ids) or len(generated[row]) >= max_new_tokens
            contexts[row] = (contexts[row] + new)[-(cfg.max_len // 2) :]
        window += 1
    return generated


def _continue(
    cfg: ModelConfig,
    params: Any,
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
        max_new_tokens=steps,
        **sampling,
    )
    return np.asarray(out).tolist()
