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
# # 6. From GPT-2 to a modern decoder, one field at a time
#
# The decoders trained today (Llama, Mistral, Qwen, SmolLM) are GPT-2's block with four pieces
# changed. In this library each change is one field of `ModelConfig`, on the same layers:
#
# | GPT-2 | modern | field |
# | --- | --- | --- |
# | learned position table | rotary positions (RoFormer) | `positions="rope"`, `rope_theta` |
# | GELU FFN, two matrices | SwiGLU FFN, three (Shazeer 2020) | `activation="swiglu"` |
# | LayerNorm, biases | RMSNorm, no biases | `norm_type="rmsnorm"`, `use_bias=False` |
# | multi-head attention | grouped-query attention (Ainslie et al. 2023) | `num_kv_heads` |
#
# Starting from `configs/default.py` (a GPT-2-style character model of Shakespeare), each
# section below makes one more change and trains the result for the same short budget on the
# same batches, keeping the validation loss, the training speed and the bytes of the KV cache.
# The last model is `configs/llama_shakespeare.py`. Full mode trains each for 600 steps
# (about 2 minutes each on two CPU cores); quick mode (`TRANSFORMER_NOTEBOOK_QUICK=1`) trains a
# tiny model for a few steps.

# %%
import os

QUICK = os.environ.get("TRANSFORMER_NOTEBOOK_QUICK") == "1"  # CI: small sizes, same code

import importlib.util
import shutil
import statistics
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from transformer.inference.gpt import gpt_init_cache
from transformer.model import ops
from transformer.train.metrics import count_params, read_metrics
from transformer.train.run import train_and_evaluate

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs").is_dir())
print("quick mode" if QUICK else "full mode", "| devices:", jax.devices())


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# %% [markdown]
# ## The budget and the baseline
#
# Every variant gets the same config apart from the model fields it changes: the same data,
# steps, batch and learning-rate schedule, and the same seed, so they see the same batches.
# `train` runs `train_and_evaluate` and keeps what the table at the end needs.

# %%
STEPS = 20 if QUICK else 600
SMALL = dict(d_model=48, num_heads=6, d_ff=128, num_decoder_layers=2, max_len=64)


def config_for(changes):
    config = load_config("default")
    if QUICK:
        config.model.update(SMALL)
        config.data.seq_len = 64
        config.train.update(eval_batches=2, warmup_steps=5)
    config.model.update(changes)
    config.train.update(num_steps=STEPS, log_every_steps=STEPS // 5, eval_every_steps=STEPS // 2)
    config.train.update(sample_tokens=0)
    config.checkpoint.every_steps = STEPS
    return config


def kv_cache_bytes(model_cfg):
    """Bytes of the KV cache for one sequence of the full context."""
    cache = gpt_init_cache(model_cfg, 1, model_cfg.max_len, jnp.zeros((1,), jnp.int32))["kv"]
    return sum(leaf.nbytes for leaf in jax.tree.leaves(cache))


results = {}
model_changes = {}  # accumulated: each section adds its change to the previous ones


def train(name, **changes):
    model_changes.update(changes)
    workdir = tempfile.mkdtemp() if QUICK else str(ROOT / "runs" / "notebooks" / "06" / name)
    shutil.rmtree(workdir, ignore_errors=True)
    run = train_and_evaluate(config_for(model_changes), workdir)
    records = read_metrics(workdir)
    model_cfg = run.trainer.model_cfg
    results[name] = dict(
        params=count_params(run.state.params),
        val_loss=[r["val_loss"] for r in records if "val_loss" in r][-1],
        tokens_per_sec=statistics.median(r["tokens_per_sec"] for r in records[1:]),
        kv_cache=kv_cache_bytes(model_cfg),
        curve=[(r["step"], r["val_loss"]) for r in records if "val_loss" in r],
    )
    print(name, {k: v for k, v in results[name].items() if k != "curve"})
    return model_cfg, run


cfg, _ = train("GPT-2 style")
print("positions:", cfg.positions, "| activation:", cfg.activation, "| norm:", cfg.norm_type)

# %% [markdown]
# ## 1. Learned positions -> rotary positions
#
# GPT-2 adds a learned vector per position to the token embedding. Rotary embeddings instead
# rotate each query and key: the pair of dimensions (j, j + h/2) of a head turns by the angle
# `position * theta^(-2j/h)`. A rotation by i followed by the inverse of a rotation by j is a
# rotation by i - j, so the score `q_i . k_j` depends on the positions only through their
# offset. That is what lets the KV cache work at any offset and packed sequences restart their
# positions. The position table (`max_len x d_model` parameters) is gone.

# %%
q, k = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 16))  # one head of 16 dims


def score(i, j):
    rotated_q = ops.apply_rotary(q, jnp.array([[i]]), 10000.0)
    rotated_k = ops.apply_rotary(k, jnp.array([[j]]), 10000.0)
    return float(jnp.sum(rotated_q * rotated_k))


print("q_5 . k_2 =", round(score(5, 2), 5), "| q_105 . k_102 =", round(score(105, 102), 5))
print("q_5 . k_3 =", round(score(5, 3), 5), "(another offset, another score)")
assert abs(score(5, 2) - score(105, 102)) < 1e-4

cfg, _ = train("+ rotary", positions="rope")

# %% [markdown]
# ## 2. GELU -> SwiGLU
#
# The feed-forward network `GELU(x W1) W2` becomes `(SiLU(x W_gate) * x W_up) W2`: one branch
# gates the other elementwise. With three matrices instead of two, the hidden width shrinks to
# 2/3 so that the parameter count stays the same (here 768 -> 512).

# %%
changes = dict(activation="swiglu", d_ff=96 if QUICK else 512)
cfg, run = train("+ SwiGLU", **changes)
mlp = jax.tree.map(jnp.shape, run.state.params["decoder"]["layers_0"]["mlp"])
print(mlp)

# %% [markdown]
# ## 3. LayerNorm -> RMSNorm, and no biases
#
# LayerNorm subtracts the mean and divides by the standard deviation, then scales and shifts;
# RMSNorm only divides by the root mean square, `x / sqrt(mean(x^2) + eps) * scale`, and has no
# shift. Llama also drops the biases of every projection.

# %%
cfg, run = train("+ RMSNorm, no biases", norm_type="rmsnorm", use_bias=False)
norm = run.state.params["decoder"]["layers_0"]["norm_mlp"]
print("norm parameters:", list(norm), "| any bias left:", "bias" in str(jax.tree.structure(norm)))

# %% [markdown]
# ## 4. Multi-head -> grouped-query attention
#
# With `num_kv_heads` smaller than `num_heads`, keys and values have fewer heads, and each is
# shared by a group of query heads. Training barely changes; what shrinks is the KV cache, which
# holds only the key/value heads: here 6 query heads share 2 key/value heads, a third of the
# cache, so a generating server fits three times the sequences in the same memory.

# %%
cfg, run = train("+ GQA (Llama style)", num_kv_heads=2)
cache = gpt_init_cache(cfg, 1, cfg.max_len, jnp.zeros((1,), jnp.int32))["kv"]
print(jax.tree.map(jnp.shape, cache)["decoder"]["layers_0"])
if not QUICK:  # the last model is configs/llama_shakespeare.py
    llama = load_config("llama_shakespeare").model
    assert all(llama[k] == v for k, v in model_changes.items()), model_changes

# %% [markdown]
# ## The four changes side by side
#
# Same data, same steps. The KV cache is for one sequence of the full context in float32.

# %%
print(f"{'model':22s} {'params':>10s} {'val loss':>9s} {'tokens/s':>9s} {'KV cache':>9s}")
for name, r in results.items():
    print(
        f"{name:22s} {r['params']:>10,d} {r['val_loss']:>9.4f} {r['tokens_per_sec']:>9,.0f} "
        f"{r['kv_cache'] / 1024:>7.0f} KiB"
    )

names = list(results)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
for name in names:
    ax1.plot(*zip(*results[name]["curve"], strict=True), "o-", label=name)
ax1.set(xlabel="step", ylabel="validation loss (nats per character)", title="validation loss")
ax1.legend()
ax2.bar(range(len(names)), [results[n]["kv_cache"] / 1024 for n in names], color="C1")
ax2.set_xticks(range(len(names)), names, rotation=20, ha="right")
ax2.set(ylabel="KiB per sequence", title="KV cache")
plt.tight_layout()
plt.show()

# %%
first, last = results[names[0]], results[names[-1]]
assert last["kv_cache"] * 3 == first["kv_cache"]  # 2 of 6 heads cached
assert np.isfinite([r["val_loss"] for r in results.values()]).all()
print(
    f"GPT-2 style -> Llama style: validation loss {first['val_loss']:.3f} -> "
    f"{last['val_loss']:.3f}, KV cache / {first['kv_cache'] / last['kv_cache']:.0f}"
)
