"""The fused cross-entropy (no float32 logits, a hand-written backward pass) against the plain
formula, and dropout from 16 random bits per element: its keep rate, and the random bits a
training step draws."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import preset
from transformer.model import blocks, embeddings, ops
from transformer.model.config import PRESETS
from transformer.model.ops.dropout import keep_threshold
from transformer.train.config import RunConfig, base_config
from transformer.train.tasks import task_for
from transformer.train.trainer import Trainer

# ---------------------------------------------------------------------------------------------
# The loss.


def loss_inputs(dtype, b=3, t=11, v=40, real=33, seed=0):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(3.0 * rng.standard_normal((b, t, v)), dtype)
    targets = jnp.asarray(rng.integers(0, real, (b, t)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (b, t)), jnp.float32).at[0].set(1.0)
    return logits, targets, weights, real


def both_losses(logits, targets, weights, real, smoothing):
    """(sums, gradient wrt logits, gradient wrt weights) of the fused and the reference loss, for
    a combination of all three sums (so every output's backward pass is exercised)."""
    results = []
    for loss in (ops.cross_entropy, ops.cross_entropy_reference):

        def objective(x, w, loss=loss):
            sums = loss(x, targets, w, label_smoothing=smoothing, num_classes=real)
            return sums[0] + 0.7 * sums[1] - 0.3 * sums[2], sums

        (_, sums), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(
            logits, weights
        )
        results.append((sums, *grads))
    return results


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_loss_and_every_gradient_equal_the_formula_in_float32(smoothing):
    logits, targets, weights, real = loss_inputs(jnp.float32)
    (sums, d_logits, d_weights), (ref_sums, ref_logits, ref_weights) = both_losses(
        logits, targets, weights, real, smoothing
    )
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_logits, ref_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_weights, ref_weights, rtol=1e-5, atol=1e-5)
    assert not d_logits[..., real:].any()  # padded vocabulary rows get no gradient


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_fused_loss_in_bfloat16_is_within_its_resolution(smoothing):
    logits, targets, weights, real = loss_inputs(jnp.bfloat16)
    (sums, d_logits, _), (ref_sums, ref_logits, _) = both_losses(
        logits, targets, weights, real, smoothing
    )
    assert d_logits.dtype == jnp.bfloat16  # written once, in the logits' dtype
    # Statistics are float32 over the same bfloat16 values: equal up to float32 rounding.
    np.testing.assert_allclose(sums, ref_sums, rtol=1e-5)
    # The gradient is rounded to bfloat16 (8 bits of mantissa) once: within its resolution.
    diff = np.abs(np.asarray(d_logits, np.float32) - np.asarray(ref_logits, np.float32))
    assert diff.max() <= 2**-8 * np.abs(np.asarray(ref_logits, np.float32)).max()


def test_fused_loss_needs_a_third_of_the_temporary_memory_of_the_formula():
    """XLA's buffer assignment of loss + gradient from bfloat16 logits [4, 256, 4096] on the CPU
    backend: the formula holds three float32 copies of the logits at once (the logits, their
    log-softmax and its gradient); the fused loss at most one, the converted operand that this
    backend materialises for each reduction in turn (GPU and TPU fuse it into the reduction)."""
    shape = (4, 256, 4096)
    logits = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    targets = jax.ShapeDtypeStruct(shape[:2], jnp.int32)
    weights = jax.ShapeDtypeStruct(shape[:2], jnp.float32)
    f32_logits = np.prod(shape) * 4

    def temp_bytes(loss):
        def objective(x, t, w):
            return loss(x, t, w, label_smoothing=0.1, num_classes=4000)[0]

        compiled = jax.jit(jax.grad(objective)).lower(logits, targets, weights).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    fused, reference = temp_bytes(ops.cross_entropy), temp_bytes(ops.cross_entropy_reference)
    assert fused <= 1.01 * f32_logits  # measured 1.0001
    assert reference >= 2.9 * f32_logits  # measured 3.0002


def test_the_models_loss_and_gradients_equal_the_reference_loss():
    """Through a model: `model.loss_impl=fused` (the default) and `reference` give the same
    loss and parameter gradients, with label smoothing and vocabulary padding."""
    cfg = preset("tiny_gpt", real_vocab_size=50)
    fused, reference = task_for(cfg), task_for(dataclasses.replace(cfg, loss_impl="reference"))
    params = nn.meta.unbox(fused.init(jax.random.key(0))["params"])
    tokens = np.random.default_rng(0).integers(0, 50, (4, 17)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens)}

    def loss(task, p):
        return task.loss(p, batch, label_smoothing=0.1)[0]

    np.testing.assert_allclose(loss(fused, params), loss(reference, params), rtol=1e-5)
    grads = jax.grad(lambda p: loss(fused, p))(params)
    expected = jax.grad(lambda p: loss(reference, p))(params)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dropout.


@pytest.mark.parametrize("keep", [0.9, 0.5, 0.3])
def test_dropout_keeps_its_rate_and_expectation(keep):
    # The rate is a multiple of 1/65536, within 1e-4 (in fact 2^-17) of the one asked for.
    effective = keep_threshold(keep) / 65536
    assert abs(effective - keep) <= 2**-17 < 1e-4
    n = 1 << 24
    mask = np.asarray(ops.keep_mask(jax.random.key(7), keep, (64, n // 64)))
    sigma = np.sqrt(keep * (1 - keep) / n)  # 1e-4 at keep 0.5
    assert abs(mask.mean() - effective) < 5 * sigma
    # Both halves of each 32-bit word are used, independently: pairs kept together at p^2.
    lo, hi = mask[:, : n // 128], mask[:, n // 128 :]
    assert abs((lo & hi).mean() - effective**2) < 5 * np.sqrt(2 / n)
    # Kept elements are scaled by the effective rate: the mean of the output is the input's.
    x = jnp.ones((64, n // 64), jnp.float32)
    out = np.asarray(ops.dropout(x, 1 - keep, jax.random.key(7)))
    np.testing.assert_allclose(out[mask], 1 / effective, rtol=1e-6)
    assert not out[~mask].any()


def random_bits(jaxpr, factor=1):
    """Random bits a jaxpr draws (`random_bits` equations, through every nested jaxpr; a scan's
    body counted once per iteration)."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "random_bits":
            aval = eqn.outvars[0].aval
            total += factor * int(np.prod(aval.shape)) * aval.dtype.itemsize * 8
        inner = factor * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else factor
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += random_bits(sub.jaxpr, inner)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += random_bits(sub, inner)
    return total


def test_a_gpt2_small_step_draws_half_the_random_bits_of_flax_dropout(monkeypatch):
    """The step of configs/gpt2_small.py's model at 16 x 1024 tokens, traced (not compiled): 16
    random bits per dropped-out element, where `nn.Dropout` (`jax.random.bernoulli`) draws 32."""
    config = base_config()
    config.model.update(PRESETS["gpt2_small"], vocab_size=0, attention_dropout_rate=0.0)
    config.data.seq_len = 1024
    config.train.batch_size = 16
    run_cfg = RunConfig.from_any(config)
    batch = {"tokens": jax.ShapeDtypeStruct((16, 1025), jnp.int32)}

    def step_bits():  # a new trainer each time: its jitted step is traced afresh
        trainer = Trainer.build(run_cfg, run_cfg.model_config(50257), devices=jax.devices()[:1])
        jaxpr = jax.make_jaxpr(trainer.train_step)(trainer.abstract_state, batch)
        return random_bits(jaxpr.jaxpr)

    ours = step_bits()
    # Dropout on the embedding and on both sublayers of each of the 12 layers, [16, 1024, 768].
    dropped = (1 + 2 * 12) * 16 * 1024 * 768
    assert ours == 16 * dropped
    monkeypatch.setattr(blocks, "Dropout", nn.Dropout)
    monkeypatch.setattr(embeddings, "Dropout", nn.Dropout)
    assert step_bits() == 32 * dropped == 2 * ours
