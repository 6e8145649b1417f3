"""Using a trained run: load `(config, params, tokenizer)` from a workdir and generate.

    from transformer.inference import load_run, generate, translate
    model_cfg, params, tokenizer = load_run("runs/default")
    print(generate(model_cfg, params, tokenizer, ["ROMEO:"], max_new_tokens=100)[0])

The glue here turns each model into the `tokens_to_logits(tokens, cache) -> (logits, cache)`
callback that `transformer.decode` samples and beam-searches over. The cache is
`{'kv': the models' 'cache' collection, 'index': next slot (scalar), ...}`; prompts are
left-padded, so every row writes the same slot each step and `offset` (pads per row) keeps
positions and masks right.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from transformer.checkpoint import CheckpointError, Checkpoints
from transformer.config import ModelConfig
from transformer.models import GPT, EncoderDecoder

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Loading.


def read_run_config(workdir: str) -> dict[str, Any]:
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no run directory {workdir}; pass the --workdir of a training run")
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {workdir} is not a training run's workdir")
    with open(path) as f:
        return json.load(f)


def load_params(workdir: str, step: int | None = None) -> tuple[ModelConfig, Any]:
    """The model config and parameters (host NumPy arrays) of a run's newest good checkpoint."""
    config = read_run_config(workdir)
    model_cfg = ModelConfig.from_dict(config["model"])
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
    steps = [step] if step is not None else list(reversed(checkpoints.all_steps()))
    if not steps:
        raise CheckpointError(
            f"{workdir} has no checkpoint yet; train it first (train.py --workdir={workdir})"
        )
    model = GPT(model_cfg) if model_cfg.is_decoder_only else EncoderDecoder(model_cfg)
    example = jnp.zeros((1, 2), jnp.int32)
    args = (example,) if model_cfg.is_decoder_only else (example, example)
    abstract = jax.eval_shape(lambda: nn.meta.unbox(model.init(jax.random.key(0), *args)))
    target = {"params": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract["params"])}
    errors = []
    try:
        for candidate in steps:
            try:
                restored = checkpoints.manager.restore(
                    candidate,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(
                            item=target,
                            restore_args=jax.tree.map(
                                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target
                            ),
                            partial_restore=True,
                        )
                    ),
                )
                return model_cfg, restored["state"]["params"]
            except Exception as e:  # noqa: BLE001 - a damaged step: try the previous one
                errors.append(f"step {candidate}: {type(e).__name__}: {e}")
    finally:
        checkpoints.close()
    raise CheckpointError(f"no readable checkpoint in {workdir} ({'; '.join(errors)})")


def load_run(workdir: str, step: int | None = None) -> tuple[ModelConfig, Any, Any]:
    """(model config, params, tokenizer) of a training run, from its newest checkpoint."""
    from transformer.data import load_tokenizer

    model_cfg, params = load_params(workdir, step)
    return model_cfg, params, load_tokenizer(workdir)


# ---------------------------------------------------------------------------------------------
# The decoding callbacks.


def _mask_vocab_padding(logits: Array, num_classes: int | None) -> Array:
    if num_classes is None or num_classes >= logits.shape[-1]:
        return logits
    return jnp.where(
        jnp.arange(logits.shape[-1]) < num_classes, logits, jnp.finfo(logits.dtype).min
    )


def gpt_init_cache(cfg: ModelConfig, batch: int, length: int, offset: Array) -> dict[str, Any]:
    """An empty cache of `length` slots for rows left-padded by `offset` [b] tokens."""
    model = GPT(cfg)
    tokens = jnp.zeros((batch, length), jnp.int32)
    mask = jnp.ones((batch, 1, length, length), bool)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), tokens, tokens, mask, 0, method=GPT.extend)["cache"]
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
            method=GPT.extend,
            mutable=["cache"],
        )
        new_cache = {"kv": variables["cache"], "index": index + t, "offset": offset}
        return _mask_vocab_padding(logits, num_classes), new_cache

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
        return _mask_vocab_padding(logits, num_classes), new_cache

    return tokens_to_logits


def _self_cache_length(cache: dict[str, Any]) -> int:
    """Slots of the decoder's self-attention buffers (not the cross-attention ones)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache["kv"]):
        if getattr(path[-1], "key", None) == "key":
            return leaf.shape[-3]
    raise ValueError("the cache holds no self-attention buffers")
