"""LoRA adapters: the base model's function at rank 0 and at the start, merging, training only
the adapters (no optimizer state for the frozen base, which stays bit for bit), sharding like
their kernels, and every mesh giving the single-device step."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from transformer import GPT, ConfigError, preset
from transformer.model import lora
from transformer.model.sharding import LOGICAL_AXIS_RULES, make_mesh

from test_train_step import (  # isort: skip
    assert_same_step,
    lm_batch,
    one_step,
    run_steps,
    setup_for,
    tiny_config,
)

TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)))
TARGETS = {
    "gpt2": ("tiny_gpt", "q,v,o,up,down"),  # slots of GPT-2's fused qkv, its c_proj, c_fc
    "gpt2-qkv": ("tiny_gpt", "qkv,o"),  # one adapter on the fused qkv, as PEFT's c_attn
    "llama": ("llama_tiny", "q,k,v,o,gate,up,down"),  # grouped: query, key_value slots
}


def adapted(name, **fields):
    base, targets = TARGETS[name]
    return preset(base, lora_rank=4, lora_alpha=8.0, lora_targets=targets, **fields)


def init(cfg):
    return nn.meta.unbox(GPT(cfg).init(jax.random.key(0), TOKENS)["params"])


def logits(cfg, params):
    return np.asarray(GPT(cfg).apply({"params": params}, TOKENS))


def with_random_adapters(params, seed=1):
    """Adapters moved off their start (B is zero there, so A would not show)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype) if lora.is_adapter(path) else x
        ),
        params,
    )


def test_a_target_the_model_lacks_is_refused():
    """Without a gated FFN, `gate` would adapt nothing (and with no adapters at all every
    parameter would train): refused when the config is made."""
    with pytest.raises(ConfigError, match="gate adapts the gate of a gated FFN"):
        preset("tiny_gpt", lora_rank=4, lora_targets="gate")
    assert lora.targets(preset("llama_tiny", lora_rank=4, lora_targets="gate")) == ("gate",)


@pytest.mark.parametrize("name", list(TARGETS))
def test_rank_zero_and_fresh_adapters_give_the_base_models_logits(name):
    cfg = adapted(name)
    params = init(cfg)
    trainable, base_params = lora.split_trainable(params)
    paths = [path for path, _ in jax.tree_util.tree_leaves_with_path(trainable)]
    assert paths and all(lora.is_adapter(path) for path in paths)
    base = dataclasses.replace(cfg, lora_rank=0)
    expected = logits(base, base_params)
    np.testing.assert_array_equal(logits(cfg, params), expected)  # B starts at zero: exact
    merged_cfg, merged = lora.merge(cfg, jax.device_get(params))
    np.testing.assert_array_equal(logits(merged_cfg, merged), expected)


@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("scan", [False, True])
def test_merged_adapters_compute_the_adapted_model(name, scan):
    cfg = adapted(name, scan_layers=scan)
    params = with_random_adapters(init(cfg))
    merged_cfg, merged = lora.merge(cfg, jax.device_get(params))
    assert merged_cfg.lora_rank == 0
    assert not any(lora.is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(merged))
    np.testing.assert_allclose(logits(merged_cfg, merged), logits(cfg, params), atol=2e-5)
    # ... and the adapters did change the function.
    assert np.abs(logits(cfg, params) - logits(merged_cfg, lora.split_trainable(params)[1])).max()


def test_adapters_shard_like_their_kernels():
    cfg = adapted("llama")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        boxed = jax.eval_shape(lambda: GPT(cfg).init(jax.random.key(0), TOKENS))["params"]
    specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), LOGICAL_AXIS_RULES)
    attention = specs["decoder"]["layers_0"]["self_attention"]
    mlp = specs["decoder"]["layers_0"]["mlp"]
    # query [d, n, h]: A [d, r] split as the input (fsdp), B [r, n, h] as the heads (tensor).
    assert attention["query"]["kernel"] == PartitionSpec("fsdp", "tensor", None)
    assert attention["query"]["lora_a"] == PartitionSpec("fsdp", None)
    assert attention["query"]["lora_b"] == PartitionSpec(None, "tensor", None)
    # key_value [d, 2, k, h] with adapted slots: A [d, 2, r], B [2, r, k, h].
    assert attention["key_value"]["lora_a"] == PartitionSpec("fsdp", None, None)
    assert attention["key_value"]["lora_b"] == PartitionSpec(None, None, "tensor", None)
    assert mlp["wo"]["lora_a"] == PartitionSpec("tensor", None)  # [f, r]: f split as wo's
    assert mlp["wo"]["lora_b"] == PartitionSpec(None, "fsdp")


def lora_config(learning_rate=1e-3, targets="q,k,v,o,gate,up,down"):
    config = tiny_config("llama_tiny", learning_rate=learning_rate, eps=1e-6)
    config.model.update(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    return config


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_only_the_adapters_train_and_hold_optimizer_state(param_dtype):
    """Also with the frozen base stored in bfloat16: the adapters and their moments stay
    float32, and the base keeps its bfloat16 values bit for bit."""
    config = lora_config(learning_rate=3e-2)
    config.model.param_dtype = param_dtype
    setup = setup_for(config, devices=jax.devices()[:1])
    with setup.within_mesh():
        start = jax.device_get(setup.new_state(0).params)
    state, losses = run_steps(setup, [lm_batch(0)] * 10)  # the adapters alone fit one batch
    end = jax.device_get(state.params)
    assert losses[-1] < losses[0]
    trained, frozen = lora.split_trainable(end)
    before_trained, before_frozen = lora.split_trainable(start)
    assert {x.dtype.name for x in jax.tree.leaves(frozen)} == {param_dtype}
    assert {x.dtype.name for x in jax.tree.leaves(trained)} == {"float32"}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert {x.dtype.name for x in moments} == {"float32"}
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(before_frozen), strict=True):
        np.testing.assert_array_equal(a, b)  # the base, bit for bit
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(before_trained), strict=True)
    ]
    assert all(changed)
    # AdamW's two moments for the adapters, and nothing for the base.
    adapter_values = sum(x.size for x in jax.tree.leaves(trained))
    state_values = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert state_values == 2 * adapter_values


@pytest.fixture(scope="module")
def lora_single_device_result():
    return one_step(setup_for(lora_config(), devices=jax.devices()[:1]))


def test_lora_on_a_2x2x2_mesh_equals_one_device(lora_single_device_result):
    result = one_step(setup_for(lora_config(), data=2, fsdp=2, tensor=2))
    assert_same_step(result, lora_single_device_result)
