"""Scoring and continuing token sequences with a GPT on a device mesh, in batches: the numeric
half of the lm-evaluation-harness backend (`transformer.evaluation.harness`), free of lm-eval.

    scorer = Scorer(cfg, params, make_mesh(), batch_size=32)
    scorer.loglikelihoods([(context_ids, continuation_ids), ...])    # [(log p, is greedy)]
    scorer.generate([context_ids, ...], max_new_tokens=32)            # [new ids]

The parameters are placed once with the run's sharding rules (`transformer.model.sharding`);
batches split their rows over the data axes. Rows are sorted by length and padded to a few
bucketed lengths and one batch size (a multiple of the data-parallel size), so a whole evaluation
compiles one program per bucket. Logits of the ids that pad the vocabulary (`cfg.num_classes`
and above) are masked: they never count in a log-likelihood, a greedy check or a sample.

A log-likelihood request is scored as lm-eval's `hf` backend scores it: the model reads
`(context + continuation)[-(max_len + 1):-1]` and the continuation's tokens are read off the last
`len(continuation)` positions.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from transformer.errors import ConfigError, DataError
from transformer.inference.decode import until_eos
from transformer.inference.gpt import SAMPLING_ARGS, continue_prompts
from transformer.model.config import ModelConfig
from transformer.model.models import GPT, init_variables
from transformer.model.ops import mask_vocab_padding
from transformer.model.sharding import (
    LOGICAL_AXIS_RULES,
    batch_sharding,
    check_model_fits,
    data_parallel_size,
    logical_to_sharding,
    replicated,
)

log = logging.getLogger(__name__)

Array = jax.Array
MIN_BUCKET = 16  # the shortest padded row length


def bucket_length(length: int, limit: int) -> int:
    """A row of `length` tokens is padded to the next power of two (at least `MIN_BUCKET`), at
    most `limit`: a few shapes, so a few compilations."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, limit)


def abstract_params(cfg: ModelConfig, mesh: Mesh) -> Any:
    """`jax.ShapeDtypeStruct`s of the model's parameters, each with its `NamedSharding` on
    `mesh` (the logical axes of `init_variables` mapped by `LOGICAL_AXIS_RULES`)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        boxed = jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))["params"]
    shardings = logical_to_sharding(boxed, mesh)
    # Unboxed without a sharding constraint: a training run calls this inside its own mesh.
    shapes = jax.tree.map(
        lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
        boxed,
        is_leaf=lambda x: isinstance(x, nn.Partitioned),
    )
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )


def place_params(params: Any, target: Any) -> Any:
    """`params` (host NumPy or device arrays) on the shardings and dtypes of `target`; arrays
    already placed so (a training run's) stay where they are."""

    def put(x: Any, t: jax.ShapeDtypeStruct) -> Array:
        if not isinstance(x, jax.Array):
            x = np.asarray(x, t.dtype)
        elif x.dtype != t.dtype:
            x = x.astype(t.dtype)
        return jax.device_put(x, t.sharding)

    return jax.tree.map(put, params, target)


def _row_scores(
    params: Any, tokens: Array, targets: Array, weights: Array, *, cfg: ModelConfig
) -> tuple[Array, Array]:
    """Per row: the summed log-probability of the weighted targets and whether each of them is
    the argmax (over the real vocabulary)."""
    logits = GPT(cfg).apply({"params": params}, tokens)  # [b, t, v] float32
    logits = mask_vocab_padding(logits, cfg.num_classes)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [b, t]
    logprobs = picked - jax.nn.logsumexp(logits, axis=-1)  # log_softmax at the targets
    greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
    return (logprobs * weights).sum(-1), greedy.all(-1)


@functools.cache
def _compiled(cfg: ModelConfig, mesh: Mesh) -> tuple[Any, Callable, Callable]:
    """(abstract sharded params, scoring step, generation step) of a model on a mesh, built once
    per process: a training run that evaluates every N steps compiles them once."""
    target = abstract_params(cfg, mesh)
    param_shardings = jax.tree.map(lambda t: t.sharding, target)
    rows, whole = batch_sharding(mesh), replicated(mesh)
    score = jax.jit(
        functools.partial(_row_scores, cfg=cfg),
        in_shardings=(param_shardings, rows, rows, rows),
        out_shardings=(whole, whole),
    )
    # The inputs arrive placed (jit takes no in_shardings with keyword arguments).
    generate = jax.jit(
        functools.partial(continue_prompts, cfg=cfg),
        out_shardings=whole,
        static_argnames=SAMPLING_ARGS,
    )
    return target, score, generate


def _global(host: np.ndarray, sharding: Any) -> Array:
    """A global array from the same host array on every process (one process: a device_put)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class Scorer:
    """A GPT's parameters placed on a mesh, and batched scoring and generation with them."""

    def __init__(self, cfg: ModelConfig, params: Any, mesh: Mesh, batch_size: int = 32):
        if not cfg.is_decoder_only:
            raise ConfigError(
                f"evaluation with lm-eval needs a GPT (decoder-only) model, not {cfg.describe()}"
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        check_model_fits(cfg, mesh)
        self.cfg, self.mesh = cfg, mesh
        devices = data_parallel_size(mesh)
        self.batch_size = -(-batch_size // devices) * devices  # rows split evenly over devices
        target, self._score, self._generate = _compiled(cfg, mesh)
        self.params = place_params(params, target)

    @contextlib.contextmanager
    def _context(self) -> Iterator[None]:
        """What model code runs under: the mesh and the logical axis rules."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            yield

    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Indices of rows, longest first, in batches of at most `batch_size`."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def loglikelihoods(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]
    ) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) per
        `(context ids, continuation ids)`; the context is left-truncated to fit `max_len`."""
        limit = self.cfg.max_len
        rows = []
        for context, continuation in requests:
            if len(continuation) > limit:
                raise DataError(
                    f"a continuation of {len(continuation)} tokens does not fit the model's "
                    f"context of {limit} tokens; shorten it or use a model with a longer max_len"
                )
            rows.append(((list(context) + list(continuation))[-(limit + 1) :], len(continuation)))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        pending = []  # dispatched batches, read back after the last: the device never waits
        with self._context():
            for batch in self._batches([len(whole) - 1 for whole, _ in rows]):
                pending.append((batch, self._score_batch([rows[i] for i in batch])))
        for batch, (logprobs, greedy) in pending:
            logprobs, greedy = np.asarray(logprobs), np.asarray(greedy)
            for r, i in enumerate(batch):
                results[i] = (float(logprobs[r]), bool(greedy[r]))
        return results

    def _score_batch(self, rows: list[tuple[list[int], int]]) -> tuple[Array, Array]:
        """Per-row summed log-probabilities and greedy flags (on the devices) of up to
        `batch_size` rows `(context + continuation tokens, continuation length)`."""
        length = bucket_length(max(len(whole) - 1 for whole, _ in rows), self.cfg.max_len)
        tokens = np.zeros((self.batch_size, length), np.int32)
        targets = np.zeros_like(tokens)
        weights = np.zeros(tokens.shape, np.float32)
        for r, (whole, scored) in enumerate(rows):
            n = len(whole) - 1
            tokens[r, :n], targets[r, :n] = whole[:-1], whole[1:]
            weights[r, n - scored : n] = 1.0
        sharding = batch_sharding(self.mesh)
        return self._score(self.params, *(_global(a, sharding) for a in (tokens, targets, weights)))

    def generate(
        self,
        contexts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        eos_id: int | None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> list[list[int]]:
        """Up to `max_new_tokens` new ids per (non-empty) context, cut before the first
        `eos_id`; temperature 0 is greedy. Contexts are left-truncated to leave room for the new
        tokens in `max_len`; a request for `max_len` or more new tokens gets `max_len - 1`."""
        if max_new_tokens < 1:
            return [[] for _ in contexts]
        limit = self.cfg.max_len
        steps = min(max_new_tokens, limit - 1)
        if steps < max_new_tokens:
            log.warning(
                "%d new tokens do not fit the model's context of %d; generating %d",
                max_new_tokens,
                limit,
                steps,
            )
        rows = [list(ids)[-(limit - steps) :] for ids in contexts]
        if any(not ids for ids in rows):
            raise DataError("generation needs a non-empty context; start it with the EOS token")
        sampling = dict(
            max_new_tokens=steps,
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
        )
        out: list[list[int]] = [[] for _ in rows]
        key = jax.random.key(seed)
        with self._context():
            for n, batch in enumerate(self._batches([len(ids) for ids in rows])):
                batch_key = jax.random.fold_in(key, n)
                ids = self._generate_batch([rows[i] for i in batch], batch_key, eos_id, sampling)
                for i, new in zip(batch, ids, strict=False):
                    out[i] = until_eos(new, eos_id)
        return out

    def _generate_batch(
        self, rows: list[list[int]], key: Array, eos_id: int | None, sampling: dict[str, Any]
    ) -> list[list[int]]:
        length = bucket_length(max(map(len, rows)), self.cfg.max_len - sampling["max_new_tokens"])
        # Spare rows repeat the first one, so they end when it does (the loop stops when all
        # rows have emitted EOS).
        rows = rows + [rows[0]] * (self.batch_size - len(rows))
        prompt = np.zeros((self.batch_size, length), np.int32)
        for r, ids in enumerate(rows):
            prompt[r, length - len(ids) :] = ids
        offset = np.asarray([length - len(ids) for ids in rows], np.int32)
        sharding = batch_sharding(self.mesh)
        new = self._generate(
            self.params,
            _global(prompt, sharding),
            _global(offset, sharding),
            jax.device_put(key, replicated(self.mesh)),
            eos_id=eos_id,
            **sampling,
        )
        return np.asarray(new).tolist()
