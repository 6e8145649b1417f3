"""The modern decoder's four switches (rotary positions, SwiGLU/GeGLU, grouped-query attention,
RMSNorm) against their papers' formulas and against the multi-head model they generalise."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import GPT, ConfigError, EncoderDecoder, ModelConfig, preset
from transformer.model import ops
from transformer.model.layers import FeedForward
from transformer.model.sharding import check_model_fits, make_mesh


def init(model, *args, **kwargs):
    """Random parameters of the model's shapes (N(0, 0.2), norm scales near 1): the checks here
    compare functions, and skipping the compiled initialiser keeps them fast on a small CPU."""
    shapes = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), *args)
    leaves, tree = jax.tree.flatten(nn.meta.unbox(shapes["params"]))
    rng = np.random.default_rng(0)
    values = [
        jnp.asarray(rng.normal(0.0, 0.2, leaf.shape) + (leaf.ndim == 1), leaf.dtype)
        for leaf in leaves
    ]
    return jax.tree.unflatten(tree, values)


rotary = jax.jit(ops.apply_rotary, static_argnums=(2, 3))
attention = jax.jit(ops.dot_product_attention)


def apply(model, params, *args, **kwargs):
    return jax.jit(functools.partial(model.apply, **kwargs))({"params": params}, *args)


def count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def tokens(shape, vocab=64, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


# --------------------------------------------------------------------------------------------
# Rotary positions (RoFormer, Su et al. 2021).


def numpy_rotary(x, position, theta):
    """RoFormer's rotation written out: each pair (x_j, x_{j+h/2}) turned by position * w_j,
    w_j = theta^(-2j/h), with one 2x2 rotation matrix per pair, in float64."""
    h = x.shape[-1]
    out = np.empty_like(x, dtype=np.float64)
    for j in range(h // 2):
        angle = position * theta ** (-2.0 * j / h)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        out[..., [j, j + h // 2]] = np.asarray(x[..., [j, j + h // 2]], np.float64) @ rotation.T
    return out


def test_rotary_is_the_roformer_rotation():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16))
    positions = jnp.array([[0, 1, 2, 3, 4], [7, 100, 1000, 5, 0]])
    got = rotary(x, positions, 10000.0)
    for b in range(2):
        for t in range(5):
            expected = numpy_rotary(np.asarray(x[b, t]), int(positions[b, t]), 10000.0)
            np.testing.assert_allclose(got[b, t], expected, atol=1e-4)
    # A rotation: lengths are kept, and position 0 is the identity.
    np.testing.assert_allclose(jnp.linalg.norm(got, axis=-1), jnp.linalg.norm(x, axis=-1), 1e-5)
    np.testing.assert_array_equal(got[0, 0], x[0, 0])


def test_fused_projections_rotate_queries_and_keys_only():
    qkv = jax.random.normal(jax.random.key(4), (2, 6, 3, 4, 8))
    positions = jnp.broadcast_to(jnp.arange(6) + 3, (2, 6))
    fused = rotary(qkv, positions, 10000.0, turned=2)
    for slot in (0, 1):
        expected = rotary(qkv[:, :, slot], positions, 10000.0)
        np.testing.assert_allclose(fused[:, :, slot], expected, atol=1e-6)
    np.testing.assert_array_equal(fused[:, :, 2], qkv[:, :, 2])  # values keep angle 0


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rotary_scores_depend_only_on_the_relative_offset(theta):
    """q_i . k_j is a function of i - j: shifting both positions by any amount keeps it."""
    q, k = jax.random.normal(jax.random.key(1), (2, 1, 1, 4, 32))

    def score(i, j):
        qi = rotary(q, jnp.array([[i]]), theta)
        kj = rotary(k, jnp.array([[j]]), theta)
        return jnp.sum(qi * kj, axis=-1)  # [1, 1, 4]: one score per head

    for i, j in [(3, 1), (10, 10), (0, 7)]:
        for shift in (1, 37, 500):
            np.testing.assert_allclose(score(i + shift, j + shift), score(i, j), atol=1e-4)
    assert not np.allclose(score(3, 1), score(3, 2), atol=1e-3)  # the offset itself matters


def test_rotary_model_sees_only_relative_positions():
    """A rotary GPT (no absolute position table) gives the same logits whatever position the
    sequence starts at: how a cache offset or a packed segment's restart cannot change it."""
    gpt = GPT(preset("llama_tiny"))
    x = tokens((2, 9))
    params = init(gpt, x)
    base = jnp.broadcast_to(jnp.arange(9), (2, 9))
    np.testing.assert_allclose(
        apply(gpt, params, x, positions=base + 13),
        apply(gpt, params, x),
        atol=1e-5,
    )


@pytest.mark.parametrize("name", ["llama_tiny", "tiny_gpt"])
def test_packed_rows_equal_separate_rows(name):
    gpt = GPT(preset(name, positions="rope"))
    a, b = tokens((1, 5), seed=5), tokens((1, 3), seed=6)
    params = init(gpt, a)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]])
    positions = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]])
    out = apply(gpt, params, packed, segment_ids=segments, positions=positions)
    np.testing.assert_allclose(out[:, :5], apply(gpt, params, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:], apply(gpt, params, b), atol=1e-5)


# --------------------------------------------------------------------------------------------
# Gated feed-forward networks (Shazeer 2020).


@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
def test_gated_ffn_is_the_glu_formula(activation):
    cfg = preset("llama_tiny", activation=activation)
    ffn = FeedForward(cfg)
    x = jax.random.normal(jax.random.key(2), (2, 3, cfg.d_model))
    params = init(ffn, x)
    assert sorted(params) == ["wi_gate", "wi_up", "wo"]
    gate, up, wo = (np.asarray(params[k]["kernel"], np.float64) for k in ("wi_gate", "wi_up", "wo"))
    xs = np.asarray(x, np.float64)
    a = xs @ gate
    if activation == "swiglu":  # Swish_1(a) = a * sigmoid(a)
        act = a / (1.0 + np.exp(-a))
    else:  # GELU, tanh approximation
        act = 0.5 * a * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (a + 0.044715 * a**3)))
    expected = (act * (xs @ up)) @ wo
    np.testing.assert_allclose(apply(ffn, params, x), expected, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Grouped-query attention (Ainslie et al. 2023).


def as_multi_head(params, groups):
    """The GQA model's parameters as a multi-head model's: each key/value head repeated for the
    query heads of its group, fused into one qkv kernel [d, 3, n, h]."""

    def convert(tree):
        if not isinstance(tree, dict):
            return tree
        if "key_value" in tree and "query" in tree:
            kv = jnp.repeat(tree["key_value"]["kernel"], groups, axis=-2)  # [d, 2, n, h]
            qkv = jnp.concatenate([tree["query"]["kernel"][..., None, :, :], kv], axis=-3)
            rest = {k: v for k, v in tree.items() if k not in ("query", "key_value")}
            return {**rest, "qkv": {"kernel": qkv}}
        return {k: convert(v) for k, v in tree.items()}

    return convert(params)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_grouped_query_attention_equals_multi_head_with_repeated_heads(scan, positions):
    gqa_cfg = preset("llama_tiny", num_kv_heads=2, scan_layers=scan, positions=positions)
    mha_cfg = dataclasses.replace(gqa_cfg, num_kv_heads=0)
    x = tokens((2, 11))
    gqa, mha = GPT(gqa_cfg), GPT(mha_cfg)
    params = init(gqa, x)
    converted = as_multi_head(params, groups=2)
    # The converted tree is exactly a multi-head model's tree.
    assert jax.tree.map(jnp.shape, converted) == jax.tree.map(jnp.shape, init(mha, x))
    expected = apply(mha, converted, x)
    np.testing.assert_allclose(apply(gqa, params, x), expected, atol=1e-5)
    # The plain (grouped einsum) path, taken when the weights are inspected, agrees too.
    grouped, _ = apply(gqa, params, x, mutable=["intermediates"])
    np.testing.assert_allclose(grouped, expected, atol=1e-5)


def test_grouped_attention_kernel_with_one_group_per_head_is_multi_head():
    q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 5, 4, 8))
    mask = jnp.tril(jnp.ones((1, 1, 5, 5), bool))
    full, _ = attention(q, k, v, mask)
    # Two kv heads, each repeated for two query heads, against the grouped kernel.
    grouped, _ = attention(q, k[:, :, ::2], v[:, :, ::2], mask)
    repeated, _ = attention(
        q, jnp.repeat(k[:, :, ::2], 2, axis=2), jnp.repeat(v[:, :, ::2], 2, axis=2), mask
    )
    np.testing.assert_allclose(grouped, repeated, atol=1e-6)
    assert not np.allclose(grouped, full, atol=1e-3)
    # num_kv_heads equal to num_heads is multi-head attention, the same parameters and logits.
    x = tokens((2, 6))
    explicit, default = GPT(preset("tiny_gpt", num_kv_heads=4)), GPT(preset("tiny_gpt"))
    params = init(default, x)
    assert jax.tree.map(jnp.shape, init(explicit, x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_array_equal(apply(explicit, params, x), apply(default, params, x))


def test_encoder_decoder_takes_every_switch():
    cfg = preset(
        "tiny_transformer", positions="rope", activation="swiglu", norm_type="rmsnorm",
        num_kv_heads=2, use_bias=False,
    )  # fmt: skip
    model = EncoderDecoder(cfg)
    src, tgt = tokens((2, 7)), tokens((2, 5), seed=1)
    params = init(model, src, tgt)
    assert params["decoder"]["layers_0"]["cross_attention"]["key_value"]["kernel"].shape == (
        32, 2, 2, 8,
    )  # fmt: skip
    logits = apply(model, params, src, tgt)
    assert logits.shape == (2, 5, 64) and bool(jnp.isfinite(logits).all())


def test_kv_cache_holds_only_the_key_value_heads():
    from transformer.inference.gpt import gpt_init_cache

    def cache_bytes(cfg):
        cache = gpt_init_cache(cfg, 2, 16, jnp.zeros((2,), jnp.int32))["kv"]
        return sum(leaf.nbytes for leaf in jax.tree.leaves(cache))

    mha = preset("llama_tiny", num_kv_heads=0)
    # 2 layers x (keys + values) x batch 2 x 16 slots x heads x 8 dims x 4 bytes
    assert cache_bytes(mha) == 2 * 2 * 2 * 16 * 4 * 8 * 4
    assert cache_bytes(dataclasses.replace(mha, num_kv_heads=2)) == cache_bytes(mha) // 2
    assert cache_bytes(dataclasses.replace(mha, num_kv_heads=1)) == cache_bytes(mha) // 4


# --------------------------------------------------------------------------------------------
# Presets, parameter counts, validation, sharding checks.


def llama_parameter_count(v, d, n, k, f, layers, tied):
    h = d // n
    attention = d * n * h + 2 * d * k * h + n * h * d  # W_Q, W_K, W_V (k heads), W_O; no bias
    ffn = 3 * d * f  # W_gate, W_up, W_down
    layer = attention + ffn + 2 * d  # two RMSNorm scales
    return v * d * (1 if tied else 2) + layers * layer + d  # + the final norm


def test_llama_parameter_counts_match_the_formula():
    tiny = init(GPT(preset("llama_tiny")), tokens((1, 4)))
    assert count(tiny) == llama_parameter_count(64, 32, 4, 2, 64, 2, tied=False) == 22_688
    smollm = GPT(preset("smollm_135m", scan_layers=True))  # traces one layer, not 30
    shapes = jax.eval_shape(lambda: init(smollm, jnp.zeros((1, 8), jnp.int32)))
    # SmolLM-135M: 134,515,008 parameters, as its published checkpoint has.
    assert count(shapes) == llama_parameter_count(49152, 576, 9, 3, 1536, 30, True)
    assert count(shapes) == 134_515_008


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(num_heads=4, num_kv_heads=8), "num_kv_heads"),
        (dict(num_kv_heads=-1), "num_kv_heads"),
        (dict(d_model=36, num_heads=4, positions="rope"), "positions"),  # head_dim 9 is odd
        (dict(rope_theta=0.0), "rope_theta"),
        (dict(activation="swish"), "activation"),
    ],
)
def test_bad_modern_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError, match=f"model.{field}="):
        ModelConfig(**{**dataclasses.asdict(preset("llama_tiny")), **overrides})


def test_tensor_parallelism_splits_kv_heads_only_where_they_divide():
    mesh = make_mesh(data=2, tensor=4)
    check_model_fits(preset("llama_tiny", num_heads=4, num_kv_heads=4), mesh)
    with pytest.raises(ConfigError, match=r"num_kv_heads=2 is not divisible by mesh.tensor=4"):
        check_model_fits(preset("llama_tiny", num_heads=4, num_kv_heads=2), mesh)
