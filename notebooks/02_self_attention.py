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
# # 2. Self-attention, by hand
#
# The Transformer's one new idea is attention without recurrence ("Attention Is All You Need",
# sec. 3.2). This notebook
#
# 1. recomputes a `MultiHeadAttention` layer step by step in `jax.numpy` from its parameters
#    (Q, K, V projections, scaled scores, softmax, weighted sum of V, output projection) and
#    checks the result against the library's layer;
# 2. shows why the scores are divided by $\sqrt{d_k}$ (sec. 3.2.1);
# 3. draws the causal, padding and packing masks;
# 4. looks at the attention maps of every head of a (briefly) trained GPT.
#
# Shape legend, as in `transformer/model/layers.py`: `b` batch, `t` query length, `s` key length,
# `n` heads, `h` head dimension ($d_k = d_v$), `d` model width.

# %%
import os

QUICK = os.environ.get("TRANSFORMER_NOTEBOOK_QUICK") == "1"  # CI: small sizes, same code

import importlib.util
import shutil
import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from transformer import GPT, ModelConfig, load_run
from transformer.model.attention import MultiHeadAttention
from transformer.model.layers import causal_mask, segment_mask
from transformer.train.run import train_and_evaluate

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs").is_dir())
print("quick mode" if QUICK else "full mode", "| devices:", jax.devices())

# %% [markdown]
# ## One attention layer and its parameters
#
# The library fuses the three input projections into one kernel `qkv/kernel` of shape
# `[d, 3, n, h]` (index 0, 1, 2 of the second axis: query, key, value) with a bias `[3, n, h]`;
# the output projection is `out/kernel` `[n, h, d]` with a bias `[d]`. We give every parameter
# random values (the biases start at zero, and we want them to count) and run the layer on a
# random input.

# %%
cfg = ModelConfig(d_model=32, num_heads=4, d_ff=64, num_encoder_layers=0, num_decoder_layers=1)
b, t, d, n, h = 2, 6, cfg.d_model, cfg.num_heads, cfg.head_dim
x = jax.random.normal(jax.random.key(0), (b, t, d))  # [b, t, d]
mask = causal_mask(t)  # [1, 1, t, t]: query i sees keys <= i

layer = MultiHeadAttention(cfg)
params = nn.meta.unbox(layer.init(jax.random.key(1), x, mask))["params"]
leaves, treedef = jax.tree.flatten(params)
keys = jax.random.split(jax.random.key(2), len(leaves))
params = treedef.unflatten(
    [0.3 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
)
print(jax.tree.map(jnp.shape, params))

# The layer sows its attention weights into the 'intermediates' collection.
expected, state = layer.apply({"params": params}, x, mask, mutable=["intermediates"])
expected_weights = state["intermediates"]["attention_weights"][0]  # [b, n, t, s]
print("layer output:", expected.shape)

# %% [markdown]
# ## The same computation, by hand
#
# $\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^T}{\sqrt{d_k}}\right)V$
# (eq. 1), computed for every head at once (sec. 3.2.2), then
# $\mathrm{MultiHead} = \mathrm{Concat}(\mathrm{head}_1, \dots, \mathrm{head}_n)W^O$.

# %%
w_qkv, b_qkv = params["qkv"]["kernel"], params["qkv"]["bias"]  # [d, 3, n, h], [3, n, h]
w_out, b_out = params["out"]["kernel"], params["out"]["bias"]  # [n, h, d], [d]

qkv = jnp.einsum("btd,dcnh->btcnh", x, w_qkv) + b_qkv  # [b, t, 3, n, h]
q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [b, t, n, h]
scores = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(h)  # [b, n, t, s]
scores = jnp.where(mask, scores, -jnp.inf)  # a query may not look at later keys
weights = jax.nn.softmax(scores, axis=-1)  # [b, n, t, s], every row sums to 1
heads = jnp.einsum("bnts,bsnh->btnh", weights, v)  # [b, t, n, h]: weighted sum of values
by_hand = jnp.einsum("btnh,nhd->btd", heads, w_out) + b_out  # [b, t, d]: concat heads, W^O

assert np.allclose(weights, expected_weights, atol=1e-5)
assert np.allclose(by_hand, expected, atol=1e-5), np.abs(by_hand - expected).max()
print("max difference to the library's layer:", float(jnp.abs(by_hand - expected).max()))

# %% [markdown]
# ## Why divide by $\sqrt{d_k}$?
#
# If the components of $q$ and $k$ are independent with mean 0 and variance 1, then
# $q \cdot k = \sum_{i=1}^{d_k} q_i k_i$ has variance $d_k$ (footnote 4). Large scores push the
# softmax into regions where one weight is close to 1 and the others close to 0; there its
# gradient vanishes (sec. 3.2.1). Dividing by $\sqrt{d_k}$ brings the variance back to 1 for
# every $d_k$. Below: 32 keys per query, the mean largest attention weight, and the mean
# gradient of a loss through the softmax with respect to the scores.

# %%
d_ks = [4, 16, 64, 256, 1024] if QUICK else [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
num_queries, num_keys = 256, 32


def softmax_stats(z, upstream):
    """Mean largest weight and mean |d loss / d score| for loss = sum(softmax(z) * upstream)."""
    grad = jax.grad(lambda z: jnp.sum(jax.nn.softmax(z, axis=-1) * upstream))(z)
    return float(jax.nn.softmax(z, axis=-1).max(-1).mean()), float(jnp.abs(grad).mean())


stats = {"unscaled": [], "scaled by 1/sqrt(d_k)": []}
for i, d_k in enumerate(d_ks):
    kq, kk, ku = jax.random.split(jax.random.key(i), 3)
    q = jax.random.normal(kq, (num_queries, d_k))
    k = jax.random.normal(kk, (num_keys, d_k))
    upstream = jax.random.normal(ku, (num_queries, num_keys))
    dots = q @ k.T  # [queries, keys], variance d_k
    stats["unscaled"].append(softmax_stats(dots, upstream))
    stats["scaled by 1/sqrt(d_k)"].append(softmax_stats(dots / np.sqrt(d_k), upstream))
    print(f"d_k={d_k:5d}: variance of q.k {float(dots.var()):8.1f}")

fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
for label, values in stats.items():
    ax[0].plot(d_ks, [m for m, _ in values], "o-", label=label)
    ax[1].plot(d_ks, [g for _, g in values], "o-", label=label)
ax[0].set(xscale="log", xlabel="$d_k$", ylabel="mean largest softmax weight", ylim=(0, 1.05))
ax[1].set(xscale="log", yscale="log", xlabel="$d_k$", ylabel="mean |gradient| wrt scores")
ax[0].legend()
fig.tight_layout()
assert stats["unscaled"][-1][0] > 0.9 > stats["scaled by 1/sqrt(d_k)"][-1][0]  # saturated

# %% [markdown]
# ## Masks
#
# Masks are boolean arrays `[b, 1, t, s]`, True where query `t` may attend to key `s`:
#
# * **causal** (sec. 3.2.3): the decoder must not see the future, so position $i$ sees keys
#   $\le i$. The paper sets masked scores to $-\infty$; the library uses the most negative
#   float, so a row with every key masked stays finite.
# * **padding**: batches are rectangular; padded keys (segment id 0) are never attended to.
# * **packing**: several short sequences share one row; segment ids 1, 2, ... keep them apart.

# %%
padded = jnp.asarray([[1, 1, 1, 1, 1, 0, 0, 0]])  # one sequence of 5, then 3 pads
packed = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0]])  # two sequences packed in one row, 1 pad
panels = {
    "causal": causal_mask(8),
    "padding": segment_mask(padded, padded),
    "packed segments": segment_mask(packed, packed),
    "packed + causal": segment_mask(packed, packed) & causal_mask(8),
}
fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
for ax, (title, m) in zip(axes, panels.items(), strict=True):
    ax.imshow(m[0, 0], cmap="Greys", vmin=0, vmax=1)
    ax.set(title=title, xlabel="key position s", ylabel="query position t")
fig.tight_layout()

# %% [markdown]
# The layer applied to a packed row: weights are exactly zero wherever the mask is False, and
# each real query's weights sum to 1 over the keys it may see.

# %%
x8 = jax.random.normal(jax.random.key(3), (1, 8, d))  # [b=1, t=8, d]
packed_mask = panels["packed + causal"]
_, state = layer.apply({"params": params}, x8, packed_mask, mutable=["intermediates"])
w = state["intermediates"]["attention_weights"][0]  # [1, n, t, s]
real = packed[0] > 0  # padding queries see nothing; their (uniform) rows are ignored
assert np.all(
    np.asarray(w)[0][:, real][~np.broadcast_to(packed_mask[0], w.shape[1:])[:, real]] == 0
)
np.testing.assert_allclose(w[0][:, real].sum(-1), 1.0, atol=1e-6)

fig, axes = plt.subplots(1, n, figsize=(3 * n, 3))
for head, ax in enumerate(axes):
    ax.imshow(w[0, head], cmap="viridis", vmin=0, vmax=1)
    ax.set(title=f"head {head}", xlabel="key s", ylabel="query t")
fig.tight_layout()

# %% [markdown]
# ## Attention maps of a trained GPT
#
# A random layer attends almost uniformly. We train the default character-level GPT briefly
# (quick mode: a tiny one), run a line through it with `mutable=['intermediates']` and draw the
# weights every head of every layer sowed. After a short training one typically finds heads
# that look at the previous character, heads that look back to the last space (the start of
# the word) or line, heads that park their attention on the first token when they have
# nothing to look for, and heads that spread their attention widely.

# %%
spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.train.update(num_steps=500, sample_tokens=0, eval_every_steps=0, eval_batches=10)
if QUICK:
    config.model.update(d_model=32, num_heads=4, d_ff=64, num_decoder_layers=2, max_len=64)
    config.data.seq_len = 64
    config.train.update(num_steps=60, warmup_steps=10, log_every_steps=30, eval_batches=2)

workdir = tempfile.mkdtemp() if QUICK else str(ROOT / "runs" / "notebooks" / "02_self_attention")
shutil.rmtree(workdir, ignore_errors=True)  # start afresh: an existing run would be resumed
train_and_evaluate(config, workdir)
model_cfg, trained, tokenizer = load_run(workdir)

# %%
text = "ROMEO:\nBut soft, what light through yonder window breaks?"[: model_cfg.max_len]
tokens = jnp.asarray([tokenizer.encode(text)])  # [1, t]
_, state = GPT(model_cfg).apply({"params": trained}, tokens, mutable=["intermediates"])
layers = state["intermediates"]["decoder"]
maps = np.stack(
    [layers[f"layers_{i}"]["self_attention"]["attention_weights"][0][0] for i in range(len(layers))]
)  # [l, n, t, t]
labels = [repr(c)[1:-1] for c in text]

L, N = maps.shape[:2]
fig, axes = plt.subplots(L, N, figsize=(2.6 * N, 2.6 * L), squeeze=False)
for i in range(L):
    for j in range(N):
        axes[i, j].imshow(maps[i, j], cmap="viridis", vmin=0, vmax=maps[i, j].max())
        axes[i, j].set(xticks=[], yticks=[], title=f"layer {i}, head {j}")
fig.tight_layout()

# %% [markdown]
# The most focused head (the largest mean of each row's top weight), with the characters: row
# $t$ shows where the model looked when predicting the character after position $t$.

# %%
focus = maps.max(-1).mean(-1)  # [l, n]: mean largest weight of each head
layer_i, head_i = np.unravel_index(focus.argmax(), focus.shape)
fig, ax = plt.subplots(figsize=(9, 9))
ax.imshow(maps[layer_i, head_i], cmap="viridis")
ax.set_xticks(range(len(labels)), labels, fontsize=7)
ax.set_yticks(range(len(labels)), labels, fontsize=7)
ax.set(xlabel="key (attended to)", ylabel="query", title=f"layer {layer_i}, head {head_i}")
assert np.allclose(np.triu(maps, k=1), 0) and np.allclose(maps.sum(-1), 1, atol=1e-5)
