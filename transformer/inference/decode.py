"""Decoding over a model-agnostic callback: temperature / top-k / top-p sampling and beam search.

Shape legend: b batch, k beam, t length (prompt or generated), v vocab.

Both algorithms see a model only through

    tokens_to_logits(tokens: int32[b, t], cache) -> (logits: float32[b, t, v], cache)

which consumes `t` new tokens per call, appends them to its own cache and tracks positions
itself, so the GPT, the encoder-decoder and the fakes in the tests share one sampler and one beam
search. The cache is an opaque pytree with one contract:

* every array leaf with ndim >= 1 has the batch as its leading axis (beam search repeats and
  gathers these rows);
* scalar leaves (e.g. the write index) are shared by all rows and passed through unchanged;
* its structure, shapes and dtypes are the same before and after a call (it is a
  `lax.while_loop` carry).

Under `jax.jit`, the callback and the keyword settings are static and the arrays are traced:

    gen = jax.jit(sample_tokens, static_argnums=0, static_argnames=SAMPLE_STATIC_ARGNAMES)
    tokens = gen(tokens_to_logits, prompt, cache, rng, max_new_tokens=64, top_k=40)

A static callback is hashed by identity and its closed-over arrays are baked into the program as
constants. When it closes over parameters, build it inside the jitted function instead, so the
parameters stay traced and one compilation serves every call:

    @functools.partial(jax.jit, static_argnames=("max_new_tokens",))
    def generate(params, prompt, cache, rng, max_new_tokens):
        fn = gpt_tokens_to_logits(cfg, params)
        return sample_tokens(fn, prompt, cache, rng, max_new_tokens=max_new_tokens)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Cache = Any  # a pytree honouring the contract in the module docstring
TokensToLogits = Callable[[jax.Array, Cache], tuple[jax.Array, Cache]]

SAMPLE_STATIC_ARGNAMES = ("max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "pad_id")
BEAM_SEARCH_STATIC_ARGNAMES = ("batch_size", "bos_id", "eos_id", "beam_size", "alpha", "max_len")

PAD_ID = 0  # beam search fills positions after a hypothesis's EOS with this id


# ---------------------------------------------------------------------------------------------
# Filtering and sampling one token.


def _masked(dtype: Any) -> Any:
    # The most negative finite value, not -inf: softmax over a row of masked entries and
    # differences of two masked entries stay finite instead of turning into NaN.
    return jnp.finfo(dtype).min


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keeps the `k` largest logits along the last axis and sets the rest to the float minimum.

    `k == 0` (or `k >= v`) turns the filter off. Entries tied with the k-th largest value are all
    kept, so more than `k` survive only on exact ties.
    """
    if k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {k}")
    if k == 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]  # [..., 1]
    return jnp.where(logits < kth, _masked(logits.dtype), logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter (Holtzman et al., 2019) along the last axis.

    Keeps the smallest set of most likely tokens whose probability mass is >= `p`, always at
    least the top one, and sets the rest to the float minimum. `p == 1.0` turns it off.
    """
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1.0 turns it off), got {p}")
    if p == 1.0:
        return logits
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # [..., v] descending
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    # A token is in the nucleus iff the tokens strictly before it hold less than p; the top
    # token (nothing before it) always is. Shifting the cumsum keeps the first entry exactly 0.
    mass_before = jnp.concatenate([jnp.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], -1)
    num_kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # [..., 1], >= 1
    threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)  # [..., 1]
    return jnp.where(logits < threshold, _masked(logits.dtype), logits)


def _choose_token(
    logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """One token per row from `logits` [b, v]: argmax if temperature == 0, else a filtered draw."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32)
    # Clip: dividing an already masked float-min logit by a temperature < 1 overflows to -inf.
    logits = jnp.maximum(logits / temperature, _masked(jnp.float32))  # [b, v]
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def until_eos(ids: list[int], eos_id: int | None) -> list[int]:
    """A decoded row of ids up to (not including) its first `eos_id`."""
    return ids[: ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def _is_eos(tokens: jax.Array, eos_id: int | None) -> jax.Array:
    if eos_id is None:
        return jnp.zeros(tokens.shape, bool)
    return tokens == eos_id


# ---------------------------------------------------------------------------------------------
# Sampling (GPT).


def _check_sample_args(
    prompt: jax.Array, max_new_tokens: int, temperature: float, top_k: int, top_p: float
) -> None:
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int[b, t] with t >= 1, got shape {prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 turns it off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1.0 turns it off), got {top_p}")


def sample_tokens(
    tokens_to_logits: TokensToLogits,
    prompt: jax.Array,
    cache: Cache,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """Generates `max_new_tokens` tokens per row after a left-padded prompt.

    Args:
      tokens_to_logits: the model callback (see the module docstring).
      prompt: int[b, t], LEFT-padded, so column t - 1 is every row's last real token. The sampler
        never looks at the padding: `cache` must already tell the callback each row's pad count.
      cache: the callback's empty cache for b rows, with room for t + max_new_tokens - 1 tokens.
      rng: the key; step i draws with `jax.random.fold_in(rng, i)`.
      max_new_tokens: length of the output.
      temperature: 0 is greedy (argmax; the filters are then moot), otherwise logits / temperature.
      top_k: keep the k largest logits (0: off), applied before top_p.
      top_p: keep the nucleus of mass >= top_p (1.0: off).
      eos_id: once a row emits it, its later positions are `pad_id`; the loop stops when every
        row has. None never stops early.
      pad_id: fill after EOS; also what finished rows feed the callback while others continue.

    Returns:
      int32[b, max_new_tokens], the generated tokens (EOS included, pads after it).
    """
    _check_sample_args(prompt, max_new_tokens, temperature, top_k, top_p)
    b = prompt.shape[0]
    choose = functools.partial(_choose_token, temperature=temperature, top_k=top_k, top_p=top_p)

    # Prefill the whole prompt in one call; left padding puts every row's next-token logits last.
    logits, cache = tokens_to_logits(prompt.astype(jnp.int32), cache)  # [b, t, v]
    first = choose(logits[:, -1], jax.random.fold_in(rng, 0))  # [b]
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)

    def cond(state: tuple) -> jax.Array:
        step, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, last, out, done, cache = state
        logits, cache = tokens_to_logits(last[:, None], cache)  # [b, 1, v]
        token = choose(logits[:, -1], jax.random.fold_in(rng, step))
        token = jnp.where(done, pad_id, token)
        out = jax.lax.dynamic_update_slice_in_dim(out, token[:, None], step, axis=1)
        return step + 1, token, out, done | _is_eos(token, eos_id), cache

    # The callback runs max_new_tokens - 1 more times at most: the last token is never fed back.
    state = (jnp.array(1, jnp.int32), first, out, _is_eos(first, eos_id), cache)
    return jax.lax.while_loop(cond, body, state)[2]


# ---------------------------------------------------------------------------------------------
# Beam search (encoder-decoder).


def _map_batched(fn: Callable[[jax.Array], jax.Array], tree: Cache) -> Cache:
    """Applies `fn` to the batch-leading leaves (ndim >= 1); scalar leaves are shared, kept."""
    return jax.tree.map(lambda x: x if jnp.ndim(x) == 0 else fn(x), tree)


def expand_beams(tree: Cache, beam_size: int) -> Cache:
    """[b, ...] -> [b * k, ...] for every ndim >= 1 leaf, the k copies of a row adjacent.

    This is the layout `beam_search` uses; anything the callback closes over per example (rather
    than keeping in its cache) must be expanded with this too.
    """
    return _map_batched(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def _gather_beams(tree: Cache, parents: jax.Array) -> Cache:
    """Row (i, j) of the result is row (i, parents[i, j]) of `tree`, in the [b * k] layout."""
    b, k = parents.shape
    rows = (jnp.arange(b)[:, None] * k + parents).reshape(b * k)  # [b * k]
    return _map_batched(lambda x: jnp.take(x, rows, axis=0), tree)


def length_penalty(length: jax.Array | int, alpha: float) -> jax.Array:
    """GNMT length penalty, Wu et al. (2016) eq. 14: lp(Y) = ((5 + |Y|) / 6) ** alpha.

    A hypothesis scores log P(Y) / lp(Y); alpha = 0 is plain log-probability, larger alpha favours
    longer outputs. |Y| counts generated tokens including EOS, excluding BOS.
    """
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


class _BeamState(NamedTuple):
    step: jax.Array  # int32 scalar: tokens generated so far
    last: jax.Array  # int32[b, k]: each alive hypothesis's last token (BOS at step 0)
    alive_seqs: jax.Array  # int32[b, k, t]
    alive_logp: jax.Array  # float32[b, k]: log P of each alive hypothesis
    finished_seqs: jax.Array  # int32[b, k, t]
    finished_scores: jax.Array  # float32[b, k]: log P / lp, float min where empty
    finished_flags: jax.Array  # bool[b, k]: whether the slot holds a finished hypothesis
    cache: Cache  # the callback's cache in the [b * k] layout


def _check_beam_args(
    cache: Cache, batch_size: int, beam_size: int, alpha: float, max_len: int
) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if alpha < 0:
        # With alpha < 0 the early stop's bound on alive hypotheses would no longer hold.
        raise ValueError(f"alpha must be >= 0 (0 turns the length penalty off), got {alpha}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        if jnp.ndim(leaf) >= 1 and jnp.shape(leaf)[0] != batch_size:
            raise ValueError(
                f"cache leaf {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; every "
                f"leaf with ndim >= 1 must lead with the batch ({batch_size}), scalars are shared"
            )


def beam_search(
    tokens_to_logits: TokensToLogits,
    cache: Cache,
    *,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    alpha: float = 0.6,
    max_len: int,
) -> tuple[jax.Array, jax.Array]:
    """Beam search with the GNMT length penalty, in the alive / finished formulation.

    The paper decodes with beam 4 and alpha 0.6 up to input length + 50 tokens (sec. 6.1).
    Each example keeps `beam_size` alive hypotheses (no EOS yet) and the `beam_size` best finished
    ones. Every step extends the alive ones by one token, takes the 2k best candidates by log P
    (at most k of them end in EOS, one per parent, so k non-EOS ones always survive), moves the
    EOS ones into the finished set scored by `length_penalty`, and keeps the k best others alive.
    The loop stops at `max_len` or once, for every example, all k finished slots are full and no
    alive hypothesis could beat the worst of them.

    Args:
      tokens_to_logits: the model callback; called with int32[b * k, 1] per step, BOS first.
      cache: the callback's cache for `batch_size` rows, with room for `max_len` tokens. Leaves
        with ndim >= 1 are repeated to b * k rows (copies of an example adjacent, as
        `expand_beams`) and gathered as beams are reordered; scalar leaves pass through.
      batch_size: b.
      bos_id: the first token fed; not part of the output.
      eos_id: ends a hypothesis.
      beam_size: k; the vocabulary must be larger than k.
      alpha: length penalty exponent (>= 0).
      max_len: the most tokens generated per hypothesis, EOS included.

    Returns:
      (sequences int32[b, k, max_len], positions after EOS set to PAD_ID; scores float32[b, k]
      = log P / lp), best first. Finished hypotheses come first; an example with fewer than k
      finished is topped up with its best alive ones (length max_len, no EOS), scored with
      lp(max_len).
    """
    _check_beam_args(cache, batch_size, beam_size, alpha, max_len)
    b, k = batch_size, beam_size
    # logP only falls as tokens are added and lp only grows (alpha >= 0), so logP / lp(max_len)
    # bounds every score an alive hypothesis can still reach.
    max_lp = length_penalty(max_len, alpha)

    def cond(s: _BeamState) -> jax.Array:
        best_alive = jnp.max(s.alive_logp, axis=1) / max_lp  # [b]
        worst_finished = jnp.min(s.finished_scores, axis=1)  # [b]
        done = jnp.all(s.finished_flags, axis=1) & (worst_finished >= best_alive)  # [b]
        return (s.step < max_len) & ~jnp.all(done)

    step = functools.partial(
        _beam_step, tokens_to_logits=tokens_to_logits, eos_id=eos_id, alpha=alpha
    )
    empty = jnp.full((b, k, max_len), PAD_ID, jnp.int32)
    state = _BeamState(
        step=jnp.array(0, jnp.int32),
        last=jnp.full((b, k), bos_id, jnp.int32),
        alive_seqs=empty,
        alive_logp=jnp.zeros((b, k), jnp.float32),
        finished_seqs=empty,
        finished_scores=jnp.full((b, k), _masked(jnp.float32), jnp.float32),
        finished_flags=jnp.zeros((b, k), bool),
        cache=expand_beams(cache, k),
    )
    return _best_hypotheses(jax.lax.while_loop(cond, step, state), max_lp)


def _beam_step(
    s: _BeamState, *, tokens_to_logits: TokensToLogits, eos_id: int, alpha: float
) -> _BeamState:
    """One token more for every alive hypothesis: the 2k best candidates by log P, those that
    end in EOS into the finished set (scored by `length_penalty`), the k best others alive."""
    b, k = s.last.shape
    masked = _masked(jnp.float32)
    logits, cache = tokens_to_logits(s.last.reshape(b * k, 1), s.cache)  # [b * k, 1, v]
    v = logits.shape[-1]
    if v <= k:
        raise ValueError(f"beam_size {k} needs a vocabulary larger than it, got {v}")
    logp = jax.nn.log_softmax(logits[:, -1].astype(jnp.float32), axis=-1).reshape(b, k, v)
    cand_logp = (s.alive_logp[:, :, None] + logp).reshape(b, k * v)
    # At step 0 the k beams are copies of one BOS hypothesis; expanding only beam 0 keeps the
    # copies (and their duplicate continuations) out of both sets.
    live = (s.step > 0) | (jnp.arange(k) == 0)  # [k]
    valid = jnp.broadcast_to(live[None, :, None], (b, k, v)).reshape(b, k * v)
    _, top = jax.lax.top_k(jnp.where(valid, cand_logp, masked), 2 * k)  # [b, 2k]
    cand_logp = jnp.take_along_axis(cand_logp, top, axis=1)  # [b, 2k]
    cand_valid = jnp.take_along_axis(valid, top, axis=1)  # [b, 2k]
    parents, tokens = top // v, (top % v).astype(jnp.int32)  # [b, 2k]
    cand_seqs = jnp.take_along_axis(s.alive_seqs, parents[:, :, None], axis=1)  # [b, 2k, t]
    cand_seqs = jax.lax.dynamic_update_slice_in_dim(cand_seqs, tokens[:, :, None], s.step, 2)
    is_eos = tokens == eos_id

    # Alive: the k best candidates that did not just end.
    _, keep = jax.lax.top_k(jnp.where(is_eos | ~cand_valid, masked, cand_logp), k)  # [b, k]
    cache = _gather_beams(cache, jnp.take_along_axis(parents, keep, axis=1))

    # Finished: the k best of the old finished set and the candidates that just ended.
    ended = is_eos & cand_valid
    ended_scores = jnp.where(ended, cand_logp / length_penalty(s.step + 1, alpha), masked)
    scores = jnp.concatenate([s.finished_scores, ended_scores], axis=1)  # [b, 3k]
    _, best = jax.lax.top_k(scores, k)  # [b, k]
    flags = jnp.concatenate([s.finished_flags, ended], axis=1)
    seqs = jnp.concatenate([s.finished_seqs, cand_seqs], axis=1)  # [b, 3k, t]

    return _BeamState(
        step=s.step + 1,
        last=jnp.take_along_axis(tokens, keep, axis=1),
        alive_seqs=jnp.take_along_axis(cand_seqs, keep[:, :, None], axis=1),
        alive_logp=jnp.take_along_axis(cand_logp, keep, axis=1),
        finished_seqs=jnp.take_along_axis(seqs, best[:, :, None], axis=1),
        finished_scores=jnp.take_along_axis(scores, best, axis=1),
        finished_flags=jnp.take_along_axis(flags, best, axis=1),
        cache=cache,
    )


def _best_hypotheses(s: _BeamState, max_lp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sequences [b, k, t], scores [b, k]), best first: the finished slots, sorted with the full
    ones first, and the empty tail filled with the best alive hypotheses. That only happens when
    the loop ran to max_len (an early stop needs k finished), so the alive ones all have length
    max_len and score log P / lp(max_len)."""
    k = s.alive_logp.shape[1]
    num_finished = jnp.sum(s.finished_flags, axis=1, keepdims=True)  # [b, 1]
    slot = jnp.arange(k)[None, :]  # [1, k]
    source = jnp.where(slot < num_finished, slot, k + slot - num_finished)  # [b, k] into 2k
    seqs = jnp.concatenate([s.finished_seqs, s.alive_seqs], axis=1)  # [b, 2k, t]
    scores = jnp.concatenate([s.finished_scores, s.alive_logp / max_lp], axis=1)  # [b, 2k]
    return (
        jnp.take_along_axis(seqs, source[:, :, None], axis=1),
        jnp.take_along_axis(scores, source, axis=1),
    )
