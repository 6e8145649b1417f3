"""The jitted, sharded train step: it learns, and every mesh gives the single-device result."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from transformer.errors import ConfigError
from transformer.model.config import PRESETS
from transformer.model.ops import cross_entropy
from transformer.model.sharding import batch_sharding, global_batch
from transformer.train.config import RunConfig, base_config
from transformer.train.trainer import Trainer

VOCAB = 64


def tiny_config(preset="tiny_gpt", **train):
    config = base_config()
    config.model.update(PRESETS[preset])
    config.model.update(vocab_size=0, max_len=16)
    config.data.seq_len = 16
    config.train.update(
        batch_size=8, learning_rate=1e-2, warmup_steps=0, num_steps=100, schedule="constant"
    )
    config.train.update(train)
    return config


def setup_for(config, data=-1, fsdp=1, tensor=1, devices=None):
    config.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
    model_cfg = RunConfig.from_any(config).model_config(VOCAB)
    return Trainer.build(RunConfig.from_any(config), model_cfg, devices=devices)


def lm_batch(seed=0, batch=8, seq=16):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, VOCAB, size=(batch, seq + 1)).astype(np.int32)}


def run_steps(setup, batches):
    with setup.within_mesh():
        state = setup.new_state(0)
        losses = []
        for local in batches:
            state, metrics = setup.train_step(state, global_batch(local, setup.mesh))
            losses.append(float(metrics["loss_sum"] / metrics["tokens"]))
    return state, losses


def test_overfitting_one_batch_drives_loss_near_zero():
    setup = setup_for(tiny_config(), devices=jax.devices()[:1])
    batch = lm_batch()
    state, losses = run_steps(setup, [batch] * 150)
    assert losses[0] > 3.5  # about ln(64) = 4.16 at initialisation
    assert losses[-1] < 0.05
    assert int(state.step) == 150


MESHES = {
    "dp8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "tp4": dict(data=2, tensor=4),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
}


def equivalence_config(preset="tiny_gpt"):
    # Some gradients are zero in exact arithmetic (e.g. the key bias: softmax ignores a constant
    # added to every score) and only rounding noise in practice; Adam's first step divides by
    # |g| + eps, so eps is raised above that noise to compare parameters at 1e-5.
    return tiny_config(preset, learning_rate=1e-3, eps=1e-6)


def gradients(setup, state, local):
    def loss(params, batch):
        logits, targets, weights = setup.task.forward(params, batch)
        total, _, count = cross_entropy(logits, targets, weights)
        return total / count

    with setup.within_mesh():
        grad_fn = jax.jit(
            jax.grad(loss), in_shardings=(setup.state_sharding.params, batch_sharding(setup.mesh))
        )
        return jax.device_get(grad_fn(state.params, global_batch(local, setup.mesh)))


def one_step(setup):
    with setup.within_mesh():
        state = setup.new_state(0)
    grads = gradients(setup, state, lm_batch(0))
    state, losses = run_steps(setup, [lm_batch(0), lm_batch(1)])
    return jax.device_get(state.params), losses, grads


def assert_same_step(result, reference):
    """Parameters, losses and gradients of `one_step` equal the reference's to 1e-5."""
    (params, losses, grads), (params_1, losses_1, grads_1) = result, reference
    np.testing.assert_allclose(losses, losses_1, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_1), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.fixture(scope="module")
def single_device_result():
    return one_step(setup_for(equivalence_config(), devices=jax.devices()[:1]))


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_steps_equal_single_device(mesh, single_device_result):
    assert_same_step(
        one_step(setup_for(equivalence_config(), **MESHES[mesh])), single_device_result
    )


# The Llama-style model (rotary positions, SwiGLU, RMSNorm, no biases) with 4 query heads over
# 2 key/value heads: tensor parallelism splits both, 2 ways.
# The 2x2x2 mesh (all three kinds at once) runs by default, the single-kind meshes with -m slow.
LLAMA_MESHES = {
    "dp8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "tp2": dict(data=4, tensor=2),
    "dp2_fsdp2_tp2": dict(data=2, fsdp=2, tensor=2),
}


@pytest.fixture(scope="module")
def llama_single_device_result():
    return one_step(setup_for(equivalence_config("llama_tiny"), devices=jax.devices()[:1]))


@pytest.mark.parametrize(
    "mesh",
    [pytest.param(m, marks=pytest.mark.slow) if m != "dp2_fsdp2_tp2" else m for m in LLAMA_MESHES],
)
def test_llama_sharded_steps_equal_single_device(mesh, llama_single_device_result):
    config = equivalence_config("llama_tiny")
    assert_same_step(one_step(setup_for(config, **LLAMA_MESHES[mesh])), llama_single_device_result)


def test_shards_have_the_promised_sizes():
    setup = setup_for(tiny_config(), data=1, fsdp=8)
    with setup.within_mesh():
        state = setup.new_state(0)
    qkv = state.params["decoder"]["layers_0"]["self_attention"]["qkv"]["kernel"]  # [d, 3, n, h]
    shard = qkv.addressable_shards[0].data
    assert shard.shape == (qkv.shape[0] // 8, *qkv.shape[1:])  # FSDP: 1/8 of the embed axis
    mu = state.opt_state[1][0].mu["decoder"]["layers_0"]["mlp"]["wi"]["kernel"]
    assert mu.addressable_shards[0].data.size == mu.size // 8  # optimizer state sharded too

    setup = setup_for(tiny_config(), data=2, tensor=4)
    with setup.within_mesh():
        state = setup.new_state(0)
    layer = state.params["decoder"]["layers_0"]
    assert layer["self_attention"]["qkv"]["kernel"].addressable_shards[0].data.shape[2] == 1
    assert layer["mlp"]["wi"]["kernel"].addressable_shards[0].data.shape == (32, 64 // 4)
    assert layer["mlp"]["wo"]["kernel"].addressable_shards[0].data.shape == (64 // 4, 32)
    embedding = state.params["embed"]["token_embedding"]
    assert embedding.addressable_shards[0].data.shape == (VOCAB // 4, 32)


def test_gradient_accumulation_equals_one_big_batch():
    one = setup_for(equivalence_config(), devices=jax.devices()[:1])
    config = equivalence_config()
    config.train.grad_accum_steps = 4
    four = setup_for(config, devices=jax.devices()[:1])
    batches = [lm_batch(0), lm_batch(1)]
    state_1, losses_1 = run_steps(one, batches)
    state_4, losses_4 = run_steps(four, batches)
    np.testing.assert_allclose(losses_4, losses_1, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state_4.params), jax.tree.leaves(state_1.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_mesh_errors_name_the_fix():
    with pytest.raises(ConfigError, match="needs 6 devices but 8 exist"):
        setup_for(tiny_config(), data=2, fsdp=3, tensor=1)
    with pytest.raises(ConfigError, match="num_heads=4 is not divisible by mesh.tensor=8"):
        setup_for(tiny_config(), data=1, tensor=8)
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        setup_for(tiny_config(grad_accum_steps=3))
    with pytest.raises(ConfigError, match="batch_size a multiple of 16"):
        config = tiny_config(grad_accum_steps=2)
        setup_for(config, data=8)


@pytest.mark.parametrize("mesh", ["single", "dp2_fsdp2_tp2"])
def test_chunked_loss_steps_equal_plain_steps(mesh, single_device_result):
    config = equivalence_config()
    config.model.loss_chunk_len = 5  # 16 positions: chunks of 5, 5, 5 and 1
    sizes = dict(devices=jax.devices()[:1]) if mesh == "single" else MESHES[mesh]
    assert_same_step(one_step(setup_for(config, **sizes)), single_device_result)


@pytest.mark.slow  # the same chunked loss as the GPT's above, through the other model
def test_chunked_loss_of_the_encoder_decoder_equals_the_plain_loss():
    import dataclasses

    from transformer.model.config import preset
    from transformer.train.tasks import task_for

    cfg = preset("tiny_transformer", tie_embeddings=False, real_vocab_size=50)
    rng = np.random.default_rng(0)
    b, t = 4, 12
    batch = {
        k: jax.numpy.asarray(rng.integers(1, 60, size=(b, t)), jax.numpy.int32)
        for k in ("src", "tgt_in", "tgt_out", "src_positions", "tgt_positions")
    }
    segments = np.ones((b, t), np.int32)
    segments[0, 7:] = 0  # a padded row: weight 0 from position 7 on
    batch["src_segment_ids"] = batch["tgt_segment_ids"] = jax.numpy.asarray(segments)
    batch["src_positions"] = batch["tgt_positions"] = jax.numpy.asarray(
        np.broadcast_to(np.arange(t), (b, t))
    )
    plain = task_for(cfg)
    chunked = task_for(dataclasses.replace(cfg, loss_chunk_len=5))
    params = nn.meta.unbox(plain.init(jax.random.key(0))["params"])

    def loss(task, p):
        return task.loss(p, batch, label_smoothing=0.1)

    np.testing.assert_allclose(loss(chunked, params), loss(plain, params), rtol=1e-6)
    ours = jax.grad(lambda p: loss(chunked, p)[0])(params)
    expected = jax.grad(lambda p: loss(plain, p)[0])(params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
