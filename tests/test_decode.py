"""Sampling and beam search against fake `tokens_to_logits` callbacks with known answers."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.inference import decode

V = 8  # vocabulary of the random-table fakes
EOS, BOS = 1, 2
IMPOSSIBLE = -1e9  # logit of a token a hand-built fake never emits


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _lp(length: int, alpha: float) -> float:
    return ((5 + length) / 6) ** alpha


# ---------------------------------------------------------------------------------------------
# Fakes. All of them count the tokens they consumed in a scalar 'pos' leaf, which beam search
# must pass through unexpanded.


def table_fake(table: np.ndarray):
    """Logits of the token at stream position p with token x: table[x, p % S] + bias[row]."""
    table = jnp.asarray(table, jnp.float32)  # [v, S, v]

    def tokens_to_logits(tokens, cache):
        assert cache["pos"].ndim == 0, "scalar cache leaves must not be batched"
        t = tokens.shape[1]
        pos = (cache["pos"] + jnp.arange(t)) % table.shape[1]  # [t]
        logits = table[tokens, pos[None, :]] + cache["bias"][:, None, :]  # [b, t, v]
        return logits, {**cache, "pos": cache["pos"] + t}

    return tokens_to_logits


def table_cache(bias: np.ndarray) -> dict:
    return {"pos": jnp.zeros((), jnp.int32), "bias": jnp.asarray(bias, jnp.float32)}


def prob_fake(rules: dict):
    """Hand-built distributions: rules[prev] (or rules[(prev, pos)]) = {token: probability}."""
    vocab = 1 + max(max(d) for d in rules.values())
    max_pos = 8
    table = np.full((vocab, max_pos, vocab), IMPOSSIBLE, np.float32)
    for key, dist in rules.items():
        prevs, positions = (key, range(max_pos)) if isinstance(key, int) else ([key[0]], [key[1]])
        for prev in np.atleast_1d(prevs):
            for p in positions:
                for tok, prob in dist.items():
                    table[prev, p, tok] = math.log(prob)
    return table_fake(table), vocab


def recording(fn, calls: list):
    """Wraps a fake so each executed call appends the shape of its tokens to `calls`."""

    def tokens_to_logits(tokens, cache):
        jax.debug.callback(lambda x: calls.append(x.shape), tokens, ordered=True)
        return fn(tokens, cache)

    return tokens_to_logits


def constant_fake(tokens, cache):
    """Logits fixed per row (cache['logits'] [b, v]) whatever the tokens."""
    b, t = tokens.shape
    logits = jnp.broadcast_to(cache["logits"][:, None, :], (b, t, cache["logits"].shape[-1]))
    return logits, cache


def schedule_fake(tokens, cache):
    """Row r emits cache['schedule'][r, i] as its i-th generated token (one-hot logits)."""
    step = cache["pos"]
    token = jax.lax.dynamic_index_in_dim(cache["schedule"], step, axis=1, keepdims=False)
    logits = 10.0 * jax.nn.one_hot(token, V)  # [b, v]
    return jnp.repeat(logits[:, None], tokens.shape[1], axis=1), {**cache, "pos": step + 1}


# ---------------------------------------------------------------------------------------------
# Filters.


def test_top_k_filter_exact_mask():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.0], [0.0, -1.0, 5.0, 4.0]])
    m = np.finfo(np.float32).min
    out = np.asarray(decode.top_k_filter(logits, 2))
    np.testing.assert_array_equal(out, [[m, 3.0, 2.0, m], [m, m, 5.0, 4.0]])
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(decode.top_k_filter(logits, 0), logits)
    np.testing.assert_array_equal(decode.top_k_filter(logits, 9), logits)


def test_top_p_filter_exact_mask():
    logits = jnp.log(jnp.array([[0.1, 0.5, 0.3, 0.1], [0.25, 0.05, 0.6, 0.1]]))
    m = np.finfo(np.float32).min
    keep = lambda p: np.asarray(decode.top_p_filter(logits, p)) != m
    # Row 0 sorted: .5, .3, .1, .1; row 1: .6, .25, .1, .05.
    np.testing.assert_array_equal(keep(0.45), [[0, 1, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(keep(0.7), [[0, 1, 1, 0], [1, 0, 1, 0]])
    np.testing.assert_array_equal(keep(0.9), [[1, 1, 1, 1], [1, 0, 1, 1]])
    np.testing.assert_array_equal(keep(1e-6), [[0, 1, 0, 0], [0, 0, 1, 0]])  # top one kept
    np.testing.assert_array_equal(decode.top_p_filter(logits, 1.0), logits)
    assert np.isfinite(np.asarray(decode.top_p_filter(logits, 0.45))).all()


@pytest.mark.parametrize(
    "call",
    [
        lambda: decode.top_k_filter(jnp.zeros((1, 4)), -1),
        lambda: decode.top_p_filter(jnp.zeros((1, 4)), 0.0),
        lambda: decode.top_p_filter(jnp.zeros((1, 4)), 1.5),
    ],
)
def test_filters_reject_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------------------------------------
# Sampling.


# One compilation per settings, reused across seeds.
_jit_sample = jax.jit(
    decode.sample_tokens, static_argnums=0, static_argnames=decode.SAMPLE_STATIC_ARGNAMES
)


def _greedy_reference(table, bias, prompt, n):
    """Python loop: stream position of the prompt's last token is t - 1, then one per token."""
    t = prompt.shape[1]
    out = []
    for r in range(prompt.shape[0]):
        prev, row = prompt[r, -1], []
        for i in range(n):
            prev = int(np.argmax(table[prev, (t - 1 + i) % table.shape[1]] + bias[r]))
            row.append(prev)
        out.append(row)
    return np.array(out)


def test_greedy_is_argmax_and_prefills_in_one_call():
    rng = np.random.default_rng(0)
    table, bias = rng.normal(size=(V, 5, V)), rng.normal(size=(3, V))
    prompt = np.array([[0, 0, 5, 6], [0, 3, 4, 7], [4, 5, 6, 3]])  # left-padded with 0
    calls = []
    out = decode.sample_tokens(
        recording(table_fake(table), calls),
        jnp.asarray(prompt),
        table_cache(bias),
        jax.random.key(0),
        max_new_tokens=6,
        temperature=0.0,
    )
    jax.effects_barrier()
    np.testing.assert_array_equal(out, _greedy_reference(table, bias, prompt, 6))
    assert out.dtype == jnp.int32
    # One prefill call with the whole prompt, then one token per call; the last is not fed back.
    assert calls == [(3, 4)] + [(3, 1)] * 5


def test_sample_under_jit_matches_eager():
    rng = np.random.default_rng(1)
    table, bias = rng.normal(size=(V, 5, V)), rng.normal(size=(4, V))
    prompt, fn = jnp.asarray(rng.integers(3, V, size=(4, 3))), table_fake(table)
    kwargs = dict(max_new_tokens=7, temperature=0.8, top_k=5, top_p=0.9, eos_id=EOS)
    eager = decode.sample_tokens(fn, prompt, table_cache(bias), jax.random.key(3), **kwargs)
    jitted = _jit_sample(fn, prompt, table_cache(bias), jax.random.key(3), **kwargs)
    np.testing.assert_array_equal(jitted, eager)


def _sample_constant(logits, seed, **kwargs):
    cache = {"logits": jnp.asarray(logits, jnp.float32)}
    prompt = jnp.zeros((logits.shape[0], 1), jnp.int32)
    return np.asarray(
        _jit_sample(constant_fake, prompt, cache, jax.random.key(seed), max_new_tokens=16, **kwargs)
    )


def test_top_k_never_samples_outside_the_k_best():
    logits = np.random.default_rng(2).normal(size=(32, 10)) * 3
    top3 = np.argsort(-logits, axis=-1)[:, :3]
    seen = set()
    for seed in range(3):
        out = _sample_constant(logits, seed, top_k=3, temperature=2.0)
        assert all(np.isin(out[r], top3[r]).all() for r in range(32))
        seen |= {int(np.where(top3[r] == tok)[0][0]) for r in range(32) for tok in out[r]}
    assert seen == {0, 1, 2}  # it does sample, not just argmax


def test_top_p_never_samples_outside_the_nucleus():
    probs = np.array([0.06, 0.3, 0.04, 0.4, 0.2])
    logits = np.log(np.tile(probs, (32, 1)))
    for p, nucleus in [(0.75, {1, 3, 4}), (0.6, {1, 3})]:
        out = np.concatenate([_sample_constant(logits, seed, top_p=p) for seed in range(3)])
        assert set(out.ravel().tolist()) == nucleus
    # top-k runs first and renormalises: k=2 leaves .4/.7 and .3/.7, so p=0.5 keeps one.
    assert set(_sample_constant(logits, 0, top_k=2, top_p=0.5).ravel().tolist()) == {3}


def test_sampling_is_reproducible_per_seed():
    logits = np.zeros((8, 16))  # uniform
    a, b, c = (_sample_constant(logits, seed) for seed in (7, 7, 8))
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.5


def test_eos_pads_and_stops_the_loop_early():
    schedule = np.array(
        [
            [5, 6, EOS, 7, 7, 7, 7, 7, 7, 7],
            [5, 5, 5, 5, EOS, 7, 7, 7, 7, 7],
            [EOS, 7, 7, 7, 7, 7, 7, 7, 7, 7],
        ]
    )
    cache = {"pos": jnp.zeros((), jnp.int32), "schedule": jnp.asarray(schedule)}
    prompt = jnp.full((3, 2), 3, jnp.int32)
    calls = []
    out = decode.sample_tokens(
        recording(schedule_fake, calls),
        prompt,
        cache,
        jax.random.key(0),
        max_new_tokens=10,
        temperature=0.0,
        eos_id=EOS,
        pad_id=0,
    )
    jax.effects_barrier()
    np.testing.assert_array_equal(
        out,
        [
            [5, 6, EOS, 0, 0, 0, 0, 0, 0, 0],
            [5, 5, 5, 5, EOS, 0, 0, 0, 0, 0],
            [EOS, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
    )
    assert len(calls) == 5  # prefill + 4 steps: the loop ends once the last row emits EOS

    calls.clear()
    decode.sample_tokens(
        recording(schedule_fake, calls),
        prompt,
        cache,
        jax.random.key(0),
        max_new_tokens=10,
        temperature=0.0,
        eos_id=None,
    )
    jax.effects_barrier()
    assert len(calls) == 10  # no eos_id: runs to max_new_tokens


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=0),
        dict(max_new_tokens=4, temperature=-1.0),
        dict(max_new_tokens=4, top_k=-2),
        dict(max_new_tokens=4, top_p=0.0),
        dict(max_new_tokens=4, top_p=1.01),
    ],
)
def test_sample_rejects_bad_arguments(kwargs):
    cache = {"logits": jnp.zeros((2, V))}
    with pytest.raises(ValueError):
        decode.sample_tokens(
            constant_fake, jnp.zeros((2, 3), jnp.int32), cache, jax.random.key(0), **kwargs
        )


# ---------------------------------------------------------------------------------------------
# Beam search.


def _beam(fn, cache, **kwargs):
    seqs, scores = decode.beam_search(fn, cache, bos_id=BOS, eos_id=EOS, **kwargs)
    assert seqs.dtype == jnp.int32 and scores.dtype == jnp.float32
    return np.asarray(seqs), np.asarray(scores)


def _greedy(fn, cache, b, max_len, eos_id):
    prompt = jnp.full((b, 1), BOS, jnp.int32)
    return np.asarray(
        decode.sample_tokens(
            fn,
            prompt,
            cache,
            jax.random.key(0),
            max_new_tokens=max_len,
            temperature=0.0,
            eos_id=eos_id,
        )
    )


def _score(table, bias, seq, alpha):
    """Reference score of one output row of a table fake: log P(seq up to EOS) / lp."""
    prev, logp, n = BOS, 0.0, 0
    for i, tok in enumerate(seq):
        logp += _log_softmax(table[prev, i % table.shape[1]] + bias)[tok]
        prev, n = tok, i + 1
        if tok == EOS:
            break
    return logp / _lp(n, alpha)


def test_beam_size_one_is_greedy_without_eos():
    rng = np.random.default_rng(3)
    table, bias = rng.normal(size=(V, 7, V)), rng.normal(size=(3, V))
    table[..., EOS] = IMPOSSIBLE  # never ends: the alive hypotheses are returned
    fn, cache = table_fake(table), table_cache(bias)
    seqs, scores = _beam(fn, cache, batch_size=3, beam_size=1, alpha=0.6, max_len=6)
    greedy = _greedy(fn, cache, 3, 6, eos_id=None)
    np.testing.assert_array_equal(seqs[:, 0], greedy)
    expected = [_score(table, bias[r], greedy[r], 0.6) for r in range(3)]
    np.testing.assert_allclose(scores[:, 0], expected, rtol=1e-5)


def test_beam_size_one_is_greedy_with_eos():
    rng = np.random.default_rng(4)
    table, bias = rng.normal(size=(V, 7, V)), np.zeros((1, V))
    table[..., EOS] = IMPOSSIBLE
    path = _greedy(table_fake(table), table_cache(bias), 1, 3, eos_id=None)[0]
    table[path[-1], 3, EOS] = 30.0  # greedy ends at the 4th token with near certainty
    fn, cache = table_fake(table), table_cache(bias)
    greedy = _greedy(fn, cache, 1, 8, eos_id=EOS)
    np.testing.assert_array_equal(greedy[0], [*path, EOS, 0, 0, 0, 0])
    seqs, scores = _beam(fn, cache, batch_size=1, beam_size=1, alpha=0.6, max_len=8)
    np.testing.assert_array_equal(seqs[:, 0], greedy)
    np.testing.assert_allclose(scores[0, 0], _score(table, bias[0], greedy[0], 0.6), rtol=1e-5)


A, B, C, D = 3, 4, 5, 6


def test_beam_finds_what_greedy_misses():
    # Greedy takes A (.5) but A's continuations are weak; B (.4) then EOS (.9) is more likely.
    fn, vocab = prob_fake(
        {
            (BOS, 0): {A: 0.5, B: 0.4, C: 0.1},
            A: {C: 0.35, D: 0.3, B: 0.15, EOS: 0.2},
            B: {EOS: 0.9, C: 0.1},
            C: {EOS: 1.0},
            D: {EOS: 1.0},
        }
    )
    cache = table_cache(np.zeros((1, vocab)))
    np.testing.assert_array_equal(_greedy(fn, cache, 1, 5, EOS), [[A, C, EOS, 0, 0]])
    calls = []
    seqs, scores = _beam(
        recording(fn, calls), cache, batch_size=1, beam_size=2, alpha=0.6, max_len=5
    )
    jax.effects_barrier()
    np.testing.assert_array_equal(seqs[0], [[B, EOS, 0, 0, 0], [A, C, EOS, 0, 0]])
    # Early stop: after step 3 both finished slots are full and no alive one (log P ~ -1e9) wins.
    assert calls == [(2, 1)] * 3
    expected = [math.log(0.4 * 0.9) / _lp(2, 0.6), math.log(0.5 * 0.35) / _lp(3, 0.6)]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 2.0])
def test_length_penalty_orders_finished_hypotheses(alpha):
    # Either end at once (EOS, p=.5) or go A A A EOS (p=.4); X loops forever and never ends.
    x = C
    fn, vocab = prob_fake(
        {
            (BOS, 0): {EOS: 0.5, A: 0.4, x: 0.1},
            (A, 1): {A: 1.0},
            (A, 2): {A: 1.0},
            (A, 3): {EOS: 1.0},
            x: {x: 1.0},
        }
    )
    short, long = [EOS, 0, 0, 0, 0, 0], [A, A, A, EOS, 0, 0]
    short_score, long_score = math.log(0.5) / _lp(1, alpha), math.log(0.4) / _lp(4, alpha)
    # alpha 0: -0.693 vs -0.916, the short one wins; alpha 2: -0.693 vs -0.916 / 2.25 = -0.407.
    order = [(short, short_score), (long, long_score)]
    if alpha > 0:
        order.reverse()
    seqs, scores = _beam(
        fn, table_cache(np.zeros((1, vocab))), batch_size=1, beam_size=2, alpha=alpha, max_len=6
    )
    np.testing.assert_array_equal(seqs[0], [s for s, _ in order])
    np.testing.assert_allclose(scores[0], [s for _, s in order], rtol=1e-6)


def history_fake(table: np.ndarray):
    """Logits depend on the whole token history through a rolling hash kept per row in the cache,
    so a wrong beam gather gives wrong logits."""
    table = jnp.asarray(table, jnp.float32)  # [M, v]
    m = table.shape[0]

    def tokens_to_logits(tokens, cache):
        assert cache["pos"].ndim == 0 and tokens.shape[1] == 1
        h = (cache["hash"] * 31 + tokens[:, 0]) % m  # [b]
        logits = table[h] + cache["bias"]  # [b, v]
        return logits[:, None], {**cache, "hash": h, "pos": cache["pos"] + 1}

    return tokens_to_logits


def _history_score(table, bias, seq, alpha):
    h, prev, logp, n = 0, BOS, 0.0, 0
    for i, tok in enumerate(seq):
        h = (h * 31 + prev) % table.shape[0]
        logp += _log_softmax(table[h] + bias)[tok]
        prev, n = tok, i + 1
        if tok == EOS:
            break
    return logp / _lp(n, alpha)


def test_beam_gathers_cache_rows_and_keeps_scalars():
    rng = np.random.default_rng(5)
    table, bias = rng.normal(size=(97, V)) * 2, rng.normal(size=(2, V))
    table[:, EOS] -= 1.0  # end sometimes, not always
    fn = history_fake(table)

    def cache_for(rows):
        return {
            "hash": jnp.zeros((len(rows),), jnp.int32),
            "pos": jnp.zeros((), jnp.int32),
            "bias": jnp.asarray(bias[rows], jnp.float32),
        }

    kwargs = dict(beam_size=3, alpha=0.6, max_len=6)
    seqs, scores = _beam(fn, cache_for([0, 1]), batch_size=2, **kwargs)
    for r in range(2):
        expected = [_history_score(table, bias[r], seq, 0.6) for seq in seqs[r]]
        np.testing.assert_allclose(scores[r], expected, rtol=1e-5)
        assert (np.diff(scores[r]) <= 0).all()
        assert len({tuple(s) for s in seqs[r]}) == 3  # three distinct hypotheses
        # Each example of the batch decodes as it would alone: rows of one example stay together.
        alone = _beam(fn, cache_for([r]), batch_size=1, **kwargs)
        np.testing.assert_array_equal(alone[0][0], seqs[r])
        np.testing.assert_allclose(alone[1][0], scores[r], rtol=1e-6)
    assert (seqs == EOS).any()  # the test does exercise finished hypotheses


def test_beam_search_under_jit_matches_eager():
    rng = np.random.default_rng(6)
    fn = history_fake(rng.normal(size=(97, V)))
    cache = {
        "hash": jnp.zeros((2,), jnp.int32),
        "pos": jnp.zeros((), jnp.int32),
        "bias": jnp.zeros((2, V)),
    }
    kwargs = dict(batch_size=2, bos_id=BOS, eos_id=EOS, beam_size=2, alpha=0.6, max_len=5)
    eager = decode.beam_search(fn, cache, **kwargs)
    jitted = jax.jit(
        decode.beam_search, static_argnums=0, static_argnames=decode.BEAM_SEARCH_STATIC_ARGNAMES
    )(fn, cache, **kwargs)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_array_equal(a, b)


def test_expand_beams_layout():
    tree = {"x": jnp.arange(6).reshape(2, 3), "i": jnp.array(7)}
    out = decode.expand_beams(tree, 2)
    np.testing.assert_array_equal(out["x"], [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
    assert out["i"].ndim == 0 and int(out["i"]) == 7


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_size=2, beam_size=0, max_len=4),
        dict(batch_size=2, beam_size=2, max_len=0),
        dict(batch_size=2, beam_size=2, max_len=4, alpha=-0.1),
        dict(batch_size=0, beam_size=2, max_len=4),
        dict(batch_size=3, beam_size=2, max_len=4),  # cache rows do not match the batch
        dict(batch_size=2, beam_size=V, max_len=4),  # vocabulary not larger than the beam
    ],
)
def test_beam_search_rejects_bad_arguments(kwargs):
    cache = table_cache(np.zeros((2, V)))
    with pytest.raises(ValueError):
        decode.beam_search(table_fake(np.zeros((V, 1, V))), cache, bos_id=BOS, eos_id=EOS, **kwargs)
