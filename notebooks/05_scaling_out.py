# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5. Scaling out: data, FSDP and tensor parallelism
#
# The same training step runs on one device or on many: `jax.jit` takes explicit shardings
# over a device **mesh**, and XLA inserts the communication. This notebook simulates 8 devices
# on the CPU and shows
#
# 1. the mesh with its axes `('data', 'fsdp', 'tensor')`,
# 2. how parameters are laid out under data parallelism (DP), fully sharded data parallelism
#    (FSDP) and tensor parallelism (TP), and how many bytes of the training state each device
#    holds,
# 3. the collectives XLA adds for each strategy,
# 4. that every strategy computes the same loss and the same update as a single device.
#
# **Run this notebook in a fresh kernel**: the device count is fixed when JAX is imported.

# %%
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # before importing jax
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # simulated devices exist on the host platform
QUICK = os.environ.get("TRANSFORMER_NOTEBOOK_QUICK") == "1"  # CI: small sizes, same code

import collections
import re

import jax
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from transformer.data.pipeline import make_data
from transformer.model.config import PRESETS
from transformer.model.sharding import LOGICAL_AXIS_RULES, global_batch, make_mesh
from transformer.train.config import RunConfig, base_config
from transformer.train.trainer import Trainer

assert jax.device_count() == 8, "JAX was imported before XLA_FLAGS was set: restart the kernel"
print(jax.devices())

# %% [markdown]
# ## The mesh
#
# A mesh arranges the devices in a grid and names its axes. Here 8 devices form a
# `2 x 2 x 2` grid; on a real cluster the `tensor` axis would be the devices with the fastest
# links (inside one node), `data` the slowest (across nodes). A size of -1 takes whatever
# devices the other axes leave.

# %%
mesh = make_mesh(data=2, fsdp=2, tensor=2)
print(dict(mesh.shape))
print(np.vectorize(lambda d: d.id)(mesh.devices))  # device ids, indexed [data, fsdp, tensor]

# %% [markdown]
# ## Logical axes and the rules table
#
# Every parameter names its axes (`embed`, `heads`, `kv`, `mlp`, `vocab`, ...) where it is
# created (`transformer/model/layers.py`), and activations have names of their own
# (`activation_batch`, `activation_embed`, ...); one table maps logical names to mesh axes:
#
# * **DP**: nothing maps to `data` except the batch. Every device holds all parameters and
#   optimizer state; gradients are summed over devices (all-reduce).
# * **FSDP** (ZeRO-3): `embed` maps to `fsdp`, so each device keeps a slice of every matrix and
#   of its Adam moments; XLA gathers a layer's weights when it is used and scatters the
#   gradients back (all-gather, reduce-scatter).
# * **TP** (Megatron-LM): `heads`, `mlp` and `vocab` map to `tensor`, so attention heads and
#   feed-forward units are split: the first matrix of a block by columns, the second by rows,
#   with one all-reduce of activations per block.

# %%
table = ["| logical axis | mesh axis |", "|---|---|"]
table += [f"| `{name}` | `{axis}` |" for name, axis in LOGICAL_AXIS_RULES]
display(Markdown("\n".join(table)))

# %% [markdown]
# ## One model, several strategies
#
# A small character-level GPT (quick mode: a tiny one). `Trainer.build` builds the model,
# optimizer, mesh and the jitted, sharded steps for a config; only `config.mesh.*` differs
# between strategies.

# %%
config = base_config()
config.model.update(PRESETS["tiny_gpt"])
config.model.update(vocab_size=0, d_model=128, num_heads=4, d_ff=512, num_decoder_layers=4)
config.data.update(corpus="shakespeare", tokenizer="char", seq_len=64)
# Adam divides by |g| + eps; a larger eps keeps rounding noise in near-zero gradients (which
# differs between strategies) from being amplified into different updates.
config.train.update(
    batch_size=16, learning_rate=1e-3, warmup_steps=0, schedule="constant", eps=1e-6
)
if QUICK:
    config.model.update(d_model=32, d_ff=64, num_decoder_layers=2, max_len=32)
    config.data.seq_len = 32
    config.train.batch_size = 8

data = make_data(
    config.data, global_batch_size=config.train.batch_size, seed=0, tokenizer_path=None
)
model_cfg = RunConfig.from_any(config).model_config(data.tokenizer.vocab_size)
local_batches = [next(data.train_iter) for _ in range(3)]  # {'tokens': int32[b, seq_len + 1]}
print(model_cfg)

STRATEGIES = {
    "single device": dict(data=1, fsdp=1, tensor=1),
    "DP 8": dict(data=8, fsdp=1, tensor=1),
    "FSDP 8": dict(data=1, fsdp=8, tensor=1),
    "TP 4 x DP 2": dict(data=2, fsdp=1, tensor=4),
    "DP 2 x FSDP 2 x TP 2": dict(data=2, fsdp=2, tensor=2),
}
trainers = {}
for name, sizes in STRATEGIES.items():
    config.mesh.update(**sizes)
    devices = jax.devices()[:1] if name == "single device" else None
    trainers[name] = Trainer.build(RunConfig.from_any(config), model_cfg, devices=devices)

# %% [markdown]
# A parameter's `PartitionSpec` names, for each of its dimensions, the mesh axis that splits it
# (`None`: not split). The rules give every strategy the same specs; a mesh axis of size 1
# splits nothing, so what changes is the block each device holds. Below: the spec, and the
# shape of one device's block under each strategy (the first column is the whole array).

# %%
PARAMS = {
    "token embedding [v, d]": ("embed", "token_embedding"),
    "qkv kernel [d, 3, n, h]": ("decoder", "layers_0", "self_attention", "qkv", "kernel"),
    "attention out [n, h, d]": ("decoder", "layers_0", "self_attention", "out", "kernel"),
    "mlp wi [d, f]": ("decoder", "layers_0", "mlp", "wi", "kernel"),
    "mlp wo [f, d]": ("decoder", "layers_0", "mlp", "wo", "kernel"),
}


def lookup(tree, path):
    for key in path:
        tree = tree[key]
    return tree


table = ["| parameter | PartitionSpec | " + " | ".join(STRATEGIES) + " |"]
table.append("|---" * (len(STRATEGIES) + 2) + "|")
for label, path in PARAMS.items():
    shape = lookup(trainers["single device"].abstract_state.params, path).shape
    spec = tuple(lookup(trainers["single device"].state_sharding.params, path).spec)
    blocks = [lookup(s.state_sharding.params, path).shard_shape(shape) for s in trainers.values()]
    table.append(f"| {label} | `{spec}` | " + " | ".join(map(str, blocks)) + " |")
display(Markdown("\n".join(table)))

# %% [markdown]
# ## Where the bytes live
#
# `init_state` creates the state already sharded (`jax.jit` with `out_shardings`): no device
# ever holds the whole model unless the strategy says so. `jax.debug.visualize_array_sharding`
# draws which device holds which block of the feed-forward kernel `wi` `[d, f]`.

# %%
states = {}
for name, trainer in trainers.items():
    with trainer.within_mesh():
        states[name] = trainer.new_state(0)
    if name != "single device":
        print(f"{name}: mlp/wi/kernel {lookup(states[name].params, PARAMS['mlp wi [d, f]']).shape}")
        jax.debug.visualize_array_sharding(lookup(states[name].params, PARAMS["mlp wi [d, f]"]))


def bytes_per_device(tree):
    per_device = collections.Counter()
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            per_device[shard.device.id] += shard.data.nbytes
    return per_device


rows = [
    "| strategy | parameters per device | optimizer state per device | state on all devices |",
    "|---|---:|---:|---:|",
]
per_device = {}
for name, state in states.items():
    params, opt = bytes_per_device(state.params), bytes_per_device(state.opt_state)
    per_device[name] = max((params + opt).values())
    total = sum((params + opt).values())
    rows.append(
        f"| {name} | {max(params.values()) / 1e6:.3f} MB | {max(opt.values()) / 1e6:.3f} MB"
        f" | {total / 1e6:.3f} MB |"
    )
display(Markdown("\n".join(rows)))

fig, ax = plt.subplots(figsize=(8, 3))
ax.barh(list(per_device), [b / 1e6 for b in per_device.values()])
ax.invert_yaxis()
ax.set(xlabel="MB of training state on the fullest device")
plt.show()
# FSDP keeps about an eighth of the replicated state per device (norms and biases stay whole).
assert per_device["FSDP 8"] < 0.25 * per_device["DP 8"]

# %% [markdown]
# ## The same step under every strategy
#
# Each strategy runs three optimizer steps on the same three batches (`global_batch` places each
# batch's rows on the devices of the `data` and `fsdp` axes). We compile the step explicitly
# to read the collectives XLA inserted, then check that the losses and the updated parameters
# agree with the single device to 1e-5: sharding changes where the arithmetic happens, not
# what it computes.
#
# DP needs one (combined) all-reduce of the gradients; FSDP gathers weights before use and
# sums gradient shards; TP all-reduces activations inside every block. The counts are those of
# XLA's CPU backend; GPU and TPU compilers may pick other collectives for the same program
# (e.g. reduce-scatter where the CPU uses all-reduce and a slice). On simulated devices all
# "devices" share the same CPU cores, so timings here say nothing about real speed-ups.

# %%
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
losses, final_params, collectives = {}, {}, {}
for name, trainer in trainers.items():
    state = states[name]
    with trainer.within_mesh():
        batches = [global_batch(b, trainer.mesh) for b in local_batches]
        step = trainer.train_step.lower(state, batches[0]).compile()
        losses[name] = []
        for batch in batches:
            state, metrics = step(state, batch)
            losses[name].append(float(metrics["loss_sum"] / metrics["tokens"]))
    final_params[name] = jax.device_get(state.params)
    hlo = step.as_text()
    collectives[name] = {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in COLLECTIVES}

rows = [
    "| strategy | losses of steps 1-3 | " + " | ".join(COLLECTIVES) + " |",
    "|---|---|" + "---:|" * len(COLLECTIVES),
]
for name in STRATEGIES:
    counts = " | ".join(str(collectives[name][op]) for op in COLLECTIVES)
    rows.append(f"| {name} | {', '.join(f'{x:.6f}' for x in losses[name])} | {counts} |")
display(Markdown("\n".join(rows)))

# %%
reference = "single device"
for name in STRATEGIES:
    np.testing.assert_allclose(losses[name], losses[reference], atol=1e-5)
    for a, b in zip(
        jax.tree.leaves(final_params[name]), jax.tree.leaves(final_params[reference]), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
print("every strategy matches the single device to 1e-5")
