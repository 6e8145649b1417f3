"""`model.kernels` and `model.attention_impl='auto'`: the compute backend is one config field,
each set of kernels computes the same model, and 'auto' resolves per platform as documented."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import GPT, ConfigError, EncoderDecoder, ModelConfig, preset
from transformer.model import ops
from transformer.model.attention import MultiHeadAttention

# Random parameters of a model's shapes without running its initialiser, and random tokens.
from test_modern_decoder import init, tokens  # isort: skip


def test_auto_picks_the_cpu_kernels_on_cpu_and_the_references_elsewhere():
    assert ops.kernels("auto", "cpu") is ops.CPU_KERNELS
    assert ops.kernels("auto", "gpu") is ops.REFERENCE_KERNELS
    assert ops.kernels("auto", "tpu") is ops.REFERENCE_KERNELS
    assert ops.kernels("auto") is ops.kernels("auto", jax.default_backend())
    assert ops.kernels("reference", "cpu") is ops.REFERENCE_KERNELS
    assert ops.kernels("cpu", "gpu") is ops.CPU_KERNELS
    with pytest.raises(ValueError, match="unknown kernel set 'fast'; choose one of auto"):
        ops.kernels("fast")
    with pytest.raises(ConfigError, match=r"model.kernels='fast': must be one of auto"):
        ModelConfig(kernels="fast")


def test_each_set_has_every_op_with_the_same_signature_and_formula():
    """The two sets hold the kernels and their references, op for op (the pairs themselves are
    checked against the formulas in test_custom_gradients.py)."""
    cpu, ref = ops.CPU_KERNELS, ops.REFERENCE_KERNELS
    assert (cpu.matmul, ref.matmul) == (ops.matmul, ops.matmul_reference)
    assert (cpu.layer_norm, ref.layer_norm) == (ops.layer_norm, ops.layer_norm_reference)
    assert (cpu.rms_norm, ref.rms_norm) == (ops.rms_norm, ops.rms_norm_reference)
    assert (cpu.gelu, ref.gelu) == (ops.gelu, ops.gelu_reference)
    assert cpu.self_attention is ops.self_attention and ref.self_attention is None


def gradient_jaxpr(cfg: ModelConfig, x) -> str:
    model = GPT(cfg)
    params = init(model, x)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x))

    return str(jax.make_jaxpr(jax.grad(loss))(params))


def test_the_field_chooses_what_the_step_runs():
    """Under 'reference' the gradient holds no hand-written backward pass at all; under 'cpu'
    the hot ops bring theirs."""
    cfg = preset("tiny_gpt", max_len=16)
    x = tokens((2, 16))
    reference = gradient_jaxpr(dataclasses.replace(cfg, kernels="reference"), x)
    assert "custom_vjp" not in reference and "_backward" not in reference
    tuned = gradient_jaxpr(dataclasses.replace(cfg, kernels="cpu"), x)
    assert "_matmul_backward" in tuned and "_gelu_backward" in tuned
    assert tuned.count("custom_vjp") >= 4


CONFIGS = {
    "gpt2": preset("tiny_gpt", max_len=64),
    "llama": preset("llama_tiny", max_len=64),
    "transformer": preset("tiny_transformer", max_len=64, activation="gelu"),
}


@pytest.mark.parametrize(
    "name, dtype",
    [(name, "float32") for name in sorted(CONFIGS)]
    + [("gpt2", "bfloat16"), pytest.param("llama", "bfloat16", marks=pytest.mark.slow)],
)
def test_reference_and_cpu_kernels_compute_the_same_model(name, dtype):
    """Loss and every gradient agree between the two sets: to 1e-5 in float32, and to bfloat16's
    resolution in bfloat16 compute (float32 parameters). Length 64 takes the fused attention's
    causal split under 'cpu'; rms/layer norm, GELU or SwiGLU and grouped-query attention are
    all on the path."""
    cfg = dataclasses.replace(CONFIGS[name], dtype=dtype, dropout_rate=0.0)
    decoder_only = cfg.is_decoder_only
    x = tokens((2, 64), seed=4)
    src = tokens((2, 40), seed=5)
    args = (x,) if decoder_only else (src, x)

    def loss(kernels, params):
        c = dataclasses.replace(cfg, kernels=kernels)
        model = GPT(c) if decoder_only else EncoderDecoder(c)
        logits = model.apply({"params": params}, *args).astype(jnp.float32)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * jnp.arange(64))

    params = init(GPT(cfg) if decoder_only else EncoderDecoder(cfg), *args)
    grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)
    (a, grad_a), (b, grad_b) = grad("reference", params), grad("cpu", params)
    if dtype == "float32":
        np.testing.assert_allclose(a, b, rtol=1e-5)
        jax.tree.map(
            lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5), grad_a, grad_b
        )
    else:  # bfloat16 keeps 8 bits: compare each tensor as a whole, since sums that cancel (bias
        # gradients) amplify the rounding of single elements
        np.testing.assert_allclose(a, b, rtol=1e-2)
        for (path, u), v in zip(
            jax.tree_util.tree_leaves_with_path(grad_a), jax.tree.leaves(grad_b), strict=True
        ):
            error = np.linalg.norm(np.float64(u) - np.float64(v)) / np.linalg.norm(np.float64(v))
            assert error < 4e-2, (jax.tree_util.keystr(path), error)


class _Recorder:
    """Stands in for `jax.nn.dot_product_attention`, recording the implementation asked for and
    computing with XLA's (cuDNN needs a GPU)."""

    def __init__(self, monkeypatch):
        self.calls: list[str | None] = []
        original = jax.nn.dot_product_attention

        def record(*args, implementation=None, **kwargs):
            self.calls.append(implementation)
            return original(*args, implementation=None, **kwargs)

        monkeypatch.setattr(jax.nn, "dot_product_attention", record)


def attend(cfg, *, platform, monkeypatch, deterministic=True, cache=False, inspect=False):
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    recorder = _Recorder(monkeypatch)
    layer = MultiHeadAttention(cfg, deterministic=deterministic, causal=True)
    x = jax.random.normal(jax.random.key(1), (2, 8, cfg.d_model))
    mask = jnp.tril(jnp.ones((8, 8), bool))[None, None]
    params = init(layer, x, mask)
    recorder.calls.clear()
    rngs = {"dropout": jax.random.key(2)}
    if cache:
        layer.apply({"params": params}, x, mask, cache_index=jnp.int32(0), mutable=["cache"])
    elif inspect:
        layer.apply({"params": params}, x, mask, rngs=rngs, mutable=["intermediates"])
    else:
        layer.apply({"params": params}, x, mask, rngs=rngs)
    return recorder.calls


GPU_CFG = preset("tiny_gpt", d_model=64, num_heads=4, dtype="bfloat16", attention_impl="auto")


def test_auto_attention_takes_cudnn_on_a_gpu_when_nothing_needs_the_weights(monkeypatch):
    assert attend(GPU_CFG, platform="gpu", monkeypatch=monkeypatch) == ["cudnn"]
    train = dataclasses.replace(GPU_CFG, attention_dropout_rate=0.0)
    assert attend(train, platform="gpu", monkeypatch=monkeypatch, deterministic=False) == ["cudnn"]


@pytest.mark.parametrize(
    "why",
    ["cpu", "float32", "dropout on the weights", "decoding", "inspected", "head width 20"],
)
def test_auto_attention_keeps_the_explicit_formula_otherwise(monkeypatch, why):
    cfg, platform, kwargs = GPU_CFG, "gpu", {}
    if why == "cpu":
        platform = "cpu"
    elif why == "float32":
        cfg = dataclasses.replace(cfg, dtype="float32")
    elif why == "dropout on the weights":
        cfg = dataclasses.replace(cfg, attention_dropout_rate=0.1)
        kwargs = dict(deterministic=False)
    elif why == "decoding":
        kwargs = dict(cache=True)
    elif why == "inspected":
        kwargs = dict(inspect=True)
    else:
        cfg = dataclasses.replace(cfg, d_model=80)
    assert attend(cfg, platform=platform, monkeypatch=monkeypatch, **kwargs) == []


def test_auto_attention_on_cpu_is_the_einsum_model():
    cfg = preset("tiny_gpt", max_len=16)
    x = tokens((2, 16))
    params = {"params": init(GPT(cfg), x)}
    auto = dataclasses.replace(cfg, attention_impl="auto")
    np.testing.assert_array_equal(GPT(auto).apply(params, x), GPT(cfg).apply(params, x))


def test_fused_attention_told_causal_equals_the_formula_with_packed_segments():
    """`causal=True` hands `jax.nn.dot_product_attention` is_causal on top of the mask (cuDNN
    then skips the keys above the diagonal); with two documents packed in a row the mask hides
    more than the causal part, and the result still equals the explicit formula."""
    q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 12, 4, 8))
    segments = jnp.array([[1] * 5 + [2] * 7, [1] * 12])
    same = segments[:, None, :, None] == segments[:, None, None, :]
    mask = same & jnp.tril(jnp.ones((12, 12), bool))[None, None]
    expected, _ = ops.dot_product_attention(q, k, v, mask)
    told, _ = ops.dot_product_attention(q, k, v, mask, impl="xla", causal=True)
    np.testing.assert_allclose(told, expected, rtol=1e-5, atol=1e-6)
