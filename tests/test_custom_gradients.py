"""The hand-written backward passes in transformer/ops against autodiff of the plain formulas they
replace: values and gradients, with every kind of mask, in float32 and bfloat16. Each op's
`*_reference` twin (what a platform without the hand-written kernels would run) takes the same
checks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import preset
from transformer.model import ops
from transformer.model.layers import LayerNorm, RMSNorm, causal_mask, segment_mask

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
REFERENCE = pytest.mark.parametrize("reference", [False, True], ids=["kernel", "reference"])


def assert_close(actual, expected, dtype):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    scale = max(float(np.abs(expected).max()), 1e-6)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE[dtype] * scale)


def random(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape).astype(dtype)


def reference_attention(qkv, mask):
    """softmax(Q K^T / sqrt(d_k)) V (sec. 3.2.1) written plainly, float32 softmax; masked scores
    take the most negative float32, as in `ops.dot_product_attention`."""
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
    scores = scores / np.sqrt(q.shape[-1])
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", weights.astype(v.dtype), v)


def masks(t):
    # Two packed sequences then padding (segment 0), and one sequence then padding.
    ids = np.zeros((2, t), np.int32)
    ids[0, : t // 3], ids[0, t // 3 : t - 2] = 1, 2
    ids[1, : t - t // 4] = 1
    ids = jnp.asarray(ids)
    short = jnp.asarray(np.arange(t)[None, :] < np.array([[t // 5], [t - 1]]), jnp.int32)
    return {
        "none": None,
        "causal": causal_mask(t),
        "causal+segment": causal_mask(t) & segment_mask(ids, ids),
        "padding": segment_mask(ids, ids),  # padded queries see nothing: fully masked rows
        # Padding from early on: fully masked rows in the first half of the queries too.
        "causal+early padding": causal_mask(t) & segment_mask(short, short),
    }


CASES = [  # (mask, causal, length): `causal` skips the masked block, from length 64 on
    *[(kind, False, 9) for kind in masks(9)],
    ("causal", True, 64),
    ("causal+segment", True, 64),
    ("causal+early padding", True, 64),
    ("causal", True, 9),  # too short to split: the plain path
    ("causal", True, 63),  # odd: the plain path
]


@REFERENCE
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("kind, causal, t", CASES)
def test_self_attention_value_and_gradient(kind, causal, t, dtype, reference):
    b, n, h = 2, 3, 8
    mask = masks(t)[kind]
    qkv = random(0, (b, t, 3, n, h), dtype)
    # Queries that see no key (padding) output some average of the values and feed nothing
    # that counts: their outputs and cotangents are left out of the comparison.
    sees = np.ones((b, t), bool) if mask is None else np.broadcast_to(mask, (b, 1, t, t)).any(-1)
    sees = jnp.asarray(sees.reshape(b, t)[:, :, None, None])
    cotangent = jnp.where(sees, random(1, (b, t, n, h), dtype), 0)

    def ours(qkv, mask):
        op = ops.self_attention_reference if reference else ops.self_attention
        return op(qkv, mask, causal)

    def loss(f, qkv):
        return jnp.sum(f(qkv, mask).astype(jnp.float32) * cotangent.astype(jnp.float32))

    assert_close(
        jnp.where(sees, ours(qkv, mask), 0),
        jnp.where(sees, reference_attention(qkv, mask), 0),
        dtype,
    )
    grad = jax.grad(lambda x: loss(ours, x))(qkv)
    expected = jax.grad(lambda x: loss(reference_attention, x))(qkv)
    assert grad.dtype == dtype
    assert_close(grad, expected, dtype)
    if mask is not None:  # rows that attend nowhere pass no gradient to their query
        padded = ~np.broadcast_to(mask, (b, 1, t, t)).any(-1)[:, 0]  # [b, t]
        assert np.isfinite(np.asarray(grad, np.float32)).all()
        np.testing.assert_array_equal(np.asarray(grad, np.float32)[padded][:, 0], 0.0)


@REFERENCE
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shapes", [((2, 5, 16), (16, 3, 4, 8), 1), ((2, 5, 4, 8), (4, 8, 16), 2)])
def test_matmul_value_and_gradient(shapes, dtype, reference):
    matmul = ops.matmul_reference if reference else ops.matmul
    x_shape, w_shape, n_in = shapes
    x, w = random(0, x_shape, dtype), random(1, w_shape, dtype)
    letters = "abcdefgh"
    lead, ins = letters[: len(x_shape) - n_in], letters[4 : 4 + n_in]
    outs = "xyz"[: len(w_shape) - n_in]
    spec = f"{lead}{ins},{ins}{outs}->{lead}{outs}"
    cotangent = random(2, (*x_shape[: len(x_shape) - n_in], *w_shape[n_in:]), jnp.float32)

    def loss(f, x, w):
        return jnp.sum(f(x, w).astype(jnp.float32) * cotangent)

    assert_close(matmul(x, w, n_in), jnp.einsum(spec, x, w), dtype)
    ours = jax.grad(lambda x, w: loss(lambda a, b: matmul(a, b, n_in), x, w), (0, 1))(x, w)
    expected = jax.grad(lambda x, w: loss(lambda a, b: jnp.einsum(spec, a, b), x, w), (0, 1))(x, w)
    for a, e in zip(ours, expected, strict=True):
        assert a.dtype == dtype and a.shape == e.shape
        assert_close(a, e, dtype)


@REFERENCE
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_value_and_gradient(with_bias, dtype, reference):
    layer_norm = ops.layer_norm_reference if reference else ops.layer_norm
    x = random(0, (3, 7, 32), dtype) * 3 + 1
    scale = random(1, (32,)) * 0.5 + 1
    bias = random(2, (32,)) if with_bias else None
    cotangent = random(3, x.shape)

    def formula(x, scale, bias):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) / jnp.sqrt(var + 1e-6) * scale
        return y if bias is None else y + bias

    def loss(f, *args):
        return jnp.sum(f(*args).astype(jnp.float32) * cotangent)

    args = (x, scale, bias)
    assert_close(layer_norm(x, scale, bias, 1e-6), formula(*args), dtype)
    argnums = (0, 1, 2) if with_bias else (0, 1)
    ours = jax.grad(lambda *a: loss(lambda *b: layer_norm(*b, 1e-6), *a), argnums)(*args)
    expected = jax.grad(lambda *a: loss(formula, *a), argnums)(*args)
    for a, e in zip(ours, expected, strict=True):
        assert a.dtype == e.dtype
        assert_close(a, e, dtype)


@REFERENCE
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_rms_norm_value_and_gradient(dtype, reference):
    rms_norm = ops.rms_norm_reference if reference else ops.rms_norm
    x = random(0, (3, 7, 32), dtype) * 3 + 1
    scale = random(1, (32,)) * 0.5 + 1
    cotangent = random(3, x.shape)

    def formula(x, scale):  # Zhang and Sennrich (2019), eq. 4
        x32 = x.astype(jnp.float32)
        return x32 / jnp.sqrt(jnp.mean(x32**2, -1, keepdims=True) + 1e-6) * scale

    def loss(f, *args):
        return jnp.sum(f(*args).astype(jnp.float32) * cotangent)

    assert_close(rms_norm(x, scale, 1e-6), formula(x, scale), dtype)
    ours = jax.grad(lambda *a: loss(lambda *b: rms_norm(*b, 1e-6), *a), (0, 1))(x, scale)
    expected = jax.grad(lambda *a: loss(formula, *a), (0, 1))(x, scale)
    for a, e in zip(ours, expected, strict=True):
        assert a.dtype == e.dtype
        assert_close(a, e, dtype)


def test_rms_norm_module_equals_flax_rms_norm():
    x = random(0, (2, 5, 32)) * 2 + 0.5
    ours, flax_norm = RMSNorm(epsilon=1e-5), nn.RMSNorm(epsilon=1e-5)
    params = jax.tree.map(lambda p: p + random(1, p.shape) * 0.1, ours.init(jax.random.key(0), x))
    assert jax.tree.structure(params) == jax.tree.structure(flax_norm.init(jax.random.key(0), x))

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    assert_close(ours.apply(params, x), flax_norm.apply(params, x), jnp.float32)
    ours_grad = jax.grad(lambda p, x: loss(ours, p, x), (0, 1))(params, x)
    flax_grad = jax.grad(lambda p, x: loss(flax_norm, p, x), (0, 1))(params, x)
    jax.tree.map(lambda a, e: assert_close(a, e, jnp.float32), ours_grad, flax_grad)


def test_layer_norm_module_equals_flax_layer_norm():
    cfg = preset("tiny_gpt")
    x = random(0, (2, 5, cfg.d_model)) * 2 + 0.5
    ours = LayerNorm(epsilon=cfg.norm_epsilon)
    params = ours.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + random(1, p.shape) * 0.1, nn.meta.unbox(params))
    flax_norm = nn.LayerNorm(epsilon=cfg.norm_epsilon, use_fast_variance=False)
    assert jax.tree.structure(params) == jax.tree.structure(flax_norm.init(jax.random.key(0), x))

    def loss(module, params, x):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    assert_close(ours.apply(params, x), flax_norm.apply(params, x), jnp.float32)
    ours_grad = jax.grad(lambda p, x: loss(ours, p, x), (0, 1))(params, x)
    flax_grad = jax.grad(lambda p, x: loss(flax_norm, p, x), (0, 1))(params, x)
    jax.tree.map(lambda a, e: assert_close(a, e, jnp.float32), ours_grad, flax_grad)


@REFERENCE
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gelu_value_and_gradient(dtype, reference):
    gelu = ops.gelu_reference if reference else ops.gelu
    u = jnp.linspace(-8, 8, 1001).astype(dtype)

    def formula(u):  # tanh approximation, Hendrycks & Gimpel (2016), as in GPT-2
        u = u.astype(jnp.float32)
        return 0.5 * u * (1 + jnp.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))

    assert_close(gelu(u), formula(u), dtype)
    ours = jax.grad(lambda u: jnp.sum(gelu(u).astype(jnp.float32)))(u)
    expected = jax.grad(lambda u: jnp.sum(formula(u)))(u)
    assert ours.dtype == dtype
    assert_close(ours, expected, dtype)
