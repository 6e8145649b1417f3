"""Schedules, weight-decay mask and the loss against their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer.errors import ConfigError
from transformer.model.ops import cross_entropy
from transformer.train.optim import decay_mask, make_schedule


def test_inverse_sqrt_is_paper_equation_3():
    d, warmup = 512, 4000
    schedule = make_schedule(
        "inverse_sqrt", learning_rate=1.0, warmup_steps=warmup, num_steps=100000, d_model=d
    )
    for step_num in (1, 100, 4000, 4001, 10000, 100000):
        expected = d**-0.5 * min(step_num**-0.5, step_num * warmup**-1.5)
        # optax counts updates from 0; the paper's step_num from 1.
        np.testing.assert_allclose(float(schedule(step_num - 1)), expected, rtol=1e-6)
    # The peak is at the end of warmup.
    values = [float(schedule(s)) for s in range(0, 8000, 50)]
    assert int(np.argmax(values)) * 50 == pytest.approx(warmup - 1, abs=50)


def test_cosine_with_warmup():
    schedule = make_schedule(
        "cosine", learning_rate=1e-3, warmup_steps=100, num_steps=1100, min_learning_rate=1e-4
    )
    np.testing.assert_allclose(float(schedule(0)), 0.0)
    np.testing.assert_allclose(float(schedule(50)), 0.5e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 1e-3, rtol=1e-6)
    for step in (300, 600, 1000):
        progress = (step - 100) / 1000
        expected = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + np.cos(np.pi * progress))
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(1100)), 1e-4, rtol=1e-6)


def test_constant_schedule_and_unknown_name():
    schedule = make_schedule("constant", learning_rate=0.5, warmup_steps=10, num_steps=100)
    np.testing.assert_allclose([float(schedule(s)) for s in (5, 10, 99)], [0.25, 0.5, 0.5])
    with pytest.raises(ConfigError, match="train.schedule"):
        make_schedule("linear", learning_rate=1.0, warmup_steps=1, num_steps=2)


def test_decay_mask_only_matrices():
    params = {
        "embed": {"token_embedding": 1, "position_embedding": 1},
        "layer": {"mlp": {"wi": {"kernel": 1, "bias": 1}}, "norm": {"scale": 1, "bias": 1}},
        "lm_head": {"kernel": 1},
    }
    mask = decay_mask(params)
    assert mask["layer"]["mlp"]["wi"] == {"kernel": True, "bias": False}
    assert mask["layer"]["norm"] == {"scale": False, "bias": False}
    assert mask["embed"] == {"token_embedding": False, "position_embedding": False}
    assert mask["lm_head"]["kernel"] is True


def test_label_smoothed_cross_entropy_matches_explicit_distribution():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
    targets = rng.integers(0, 5, size=(2, 3))
    weights = np.array([[1, 1, 0], [1, 0, 0]], np.float32)  # padding ignored
    eps, classes = 0.1, 5  # ids 5 and 6 are vocabulary padding
    loss, nll, count = cross_entropy(
        jnp.asarray(logits),
        jnp.asarray(targets),
        jnp.asarray(weights),
        label_smoothing=eps,
        num_classes=classes,
    )
    real = logits[..., :classes].astype(np.float64)
    log_p = real - np.log(np.exp(real).sum(-1, keepdims=True))
    q = np.full(real.shape, eps / (classes - 1))
    np.put_along_axis(q, targets[..., None], 1 - eps, axis=-1)
    expected_loss = (-(q * log_p).sum(-1) * weights).sum()
    expected_nll = (-np.take_along_axis(log_p, targets[..., None], -1)[..., 0] * weights).sum()
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(nll, expected_nll, rtol=1e-5)
    assert float(count) == 3.0


def test_cross_entropy_without_smoothing_is_nll():
    logits = jax.random.normal(jax.random.key(0), (4, 5, 9))
    targets = jax.random.randint(jax.random.key(1), (4, 5), 0, 9)
    loss, nll, count = cross_entropy(logits, targets, jnp.ones((4, 5)))
    np.testing.assert_allclose(loss, nll)
    expected = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).sum()
    np.testing.assert_allclose(nll, expected, rtol=1e-6)
    assert float(count) == 20.0


@pytest.mark.parametrize("chunk_len", [1, 4, 5, 13, 64])  # dividing t, not, all, more than t
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(chunk_len, smoothing):
    from transformer.model.ops import chunked_cross_entropy

    rng = np.random.default_rng(0)
    b, t, d, v, real = 3, 13, 8, 24, 19  # ids 19..23 pad the vocabulary
    hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, real, size=(b, t)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, size=(b, t)), jnp.float32)  # padding positions
    weights = weights.at[:, 0].set(1.0)

    def project(kernel, h):
        return jnp.einsum("bcd,dv->bcv", h, kernel, preferred_element_type=jnp.float32)

    def plain(kernel, hidden):
        logits = project(kernel, hidden)
        return cross_entropy(logits, targets, weights, label_smoothing=smoothing, num_classes=real)

    def chunked(kernel, hidden):
        return chunked_cross_entropy(
            project,
            kernel,
            hidden,
            targets,
            weights,
            chunk_len=chunk_len,
            label_smoothing=smoothing,
            num_classes=real,
        )

    for ours, reference in zip(chunked(kernel, hidden), plain(kernel, hidden), strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-6)
    grads = jax.grad(lambda *a: chunked(*a)[0], (0, 1))(kernel, hidden)
    expected = jax.grad(lambda *a: plain(*a)[0], (0, 1))(kernel, hidden)
    for ours, reference in zip(grads, expected, strict=True):
        np.testing.assert_allclose(ours, reference, atol=1e-5)
