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
# # 4. Translation with the encoder-decoder
#
# The model of "Attention Is All You Need" (Figure 1): an encoder reads the source sentence,
# a decoder writes the translation one token at a time, attending to its own previous tokens
# (masked self-attention) and to the encoder's output (cross-attention, sec. 3.2.3). This
# notebook
#
# 1. trains a small encoder-decoder on English-German Bible verse pairs (World English Bible
#    and Elberfelder 1905; whole books are held out for validation) with the paper's recipe:
#    shared byte-level BPE vocabulary (sec. 5.1), Adam with the warmup / inverse-square-root
#    schedule (sec. 5.3, eq. 3), label smoothing (sec. 5.4);
# 2. translates held-out verses with greedy decoding and with beam search (sec. 6.1) and
#    scores both with BLEU;
# 3. draws the cross-attention of a translated sentence: which source tokens each output
#    token looked at.
#
# Full mode trains for a few minutes on a CPU, far shorter than the paper's 12 hours on 8 GPUs,
# so expect rough German with the right vocabulary and word order for common phrases; quick
# mode (`TRANSFORMER_NOTEBOOK_QUICK=1`) only checks that everything runs.

# %%
import os

QUICK = os.environ.get("TRANSFORMER_NOTEBOOK_QUICK") == "1"  # CI: small sizes, same code

import importlib.util
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from transformer import EncoderDecoder, load_run
from transformer.inference import bleu, translate
from transformer.train.metrics import read_metrics
from transformer.train.run import train_and_evaluate

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs").is_dir())
print("quick mode" if QUICK else "full mode", "| devices:", jax.devices())

# %% [markdown]
# ## The config
#
# `configs/translation_en_de.py` is the recipe `train.py` runs (a 3+3-layer model, about 20
# minutes on two CPU cores). Here we shrink it to fit a notebook: 2+2 layers of width 128
# and a 2,000-token vocabulary. The final BLEU that the training loop can compute is switched
# off (`bleu_pairs=0`) because we compute it below.

# %%
spec = importlib.util.spec_from_file_location(
    "translation", ROOT / "configs" / "translation_en_de.py"
)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.model.update(d_model=128, num_heads=4, d_ff=512, num_encoder_layers=2, num_decoder_layers=2)
config.model.max_len = 128  # beam search may write up to source length + 50 tokens
config.data.update(vocab_size=2000, seq_len=64)
config.train.update(num_steps=1200, batch_size=32, warmup_steps=300, learning_rate=1.0)
config.train.update(log_every_steps=100, eval_every_steps=500, bleu_pairs=0)
NUM_PAIRS = 371  # the whole validation split
if QUICK:
    config.model.update(d_model=64, d_ff=128, max_len=96, dropout_rate=0.0)
    config.data.update(vocab_size=1000, seq_len=48)
    config.train.update(num_steps=100, batch_size=16, warmup_steps=50, log_every_steps=25)
    config.train.update(eval_every_steps=50, eval_batches=2, peak_flops=1e11)
    NUM_PAIRS = 16
print("model:", dict(config.model))
print("train:", dict(config.train))

# %% [markdown]
# ## Training

# %%
workdir = tempfile.mkdtemp() if QUICK else str(ROOT / "runs" / "notebooks" / "04_translation")
shutil.rmtree(workdir, ignore_errors=True)  # start afresh: an existing run would be resumed
result = train_and_evaluate(config, workdir)

records = read_metrics(workdir)
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot([r["step"] for r in records], [r["train_loss"] for r in records], label="train")
val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
ax.plot(*zip(*val, strict=True), "o--", label="validation (held-out books)")
ax.set(xlabel="step", ylabel="cross-entropy (nats per token)")
ax.legend()
assert val[-1][1] < np.log(result.tokenizer.vocab_size)  # better than a uniform guess

# %% [markdown]
# ## The vocabulary
#
# One byte-level BPE vocabulary serves both languages (sec. 5.1: "a shared source-target
# vocabulary"), and the model ties the source embedding, the target embedding and the output
# projection to one matrix (sec. 3.4).

# %%
model_cfg, params, tokenizer = load_run(workdir)
for text in [
    "In the beginning God created the heavens and the earth.",
    "Im Anfang schuf Gott die Himmel und die Erde.",
]:
    print([tokenizer.decode([i]) for i in tokenizer.encode(text)])

# %% [markdown]
# ## Greedy decoding and beam search
#
# Greedy decoding takes the most likely token at every step. Beam search (sec. 6.1: beam size
# 4, length penalty $\alpha = 0.6$) keeps the 4 best partial translations and returns the best
# complete one, which often repairs an early greedy mistake. `transformer.inference.translate`
# does both (`beam_size=1` is greedy); `bleu` translates and scores with sacreBLEU.

# %%
pairs = result.eval_pairs[:NUM_PAIRS]  # (English, German) from the held-out books
scores, outputs = {}, {}
for beam_size in (1, 4):
    scores[beam_size], outputs[beam_size] = bleu(
        model_cfg, params, tokenizer, pairs, beam_size=beam_size
    )
display(
    Markdown(
        f"| decoding | BLEU on {len(pairs)} held-out verses |\n|---|---:|\n"
        f"| greedy | {scores[1]:.2f} |\n| beam search (4, alpha 0.6) | {scores[4]:.2f} |"
    )
)
for i in range(3):
    print(f"source:    {pairs[i][0]}\nreference: {pairs[i][1]}")
    print(f"greedy:    {outputs[1][i]}\nbeam 4:    {outputs[4][i]}\n")
assert all(0 <= s <= 100 for s in scores.values())

# %% [markdown]
# `translate` takes any English sentences. These two verses are from training books, yet after a
# few minutes the model has not memorised them: it has learned frequent words and phrases
# ("der Herr", "die Erde") and German word order for simple clauses.

# %%
seen = ["In the beginning God created the heavens and the earth.", "The Lord is my shepherd."]
for source, output in zip(seen, translate(model_cfg, params, tokenizer, seen), strict=True):
    print(f"{source}\n  -> {output}")

# %% [markdown]
# ## Cross-attention: what the decoder looks at
#
# Feeding the source and the model's own translation (shifted right behind `<bos>`) through the
# model with `mutable=['intermediates']` returns the attention weights every layer sowed. For
# cross-attention they have shape `[b, n, t, s]`: for each output position `t` and head `n`, a
# distribution over the source tokens `s`. In the upper layer, averaged over heads, they often
# form a rough alignment between the two sentences (a German noun on the English noun it
# translates, a name on the same name), bending where German word order differs.

# %%
source, translation = pairs[0][0], outputs[4][0]
src_ids = (tokenizer.encode(source) + [tokenizer.eos_id])[: model_cfg.max_len]
out_ids = (tokenizer.encode(translation) + [tokenizer.eos_id])[: model_cfg.max_len]
src = jnp.asarray([src_ids])  # [1, s]
tgt_in = jnp.asarray([[tokenizer.bos_id] + out_ids[:-1]])  # [1, t]
_, state = EncoderDecoder(model_cfg).apply(
    {"params": params}, src, tgt_in, mutable=["intermediates"]
)
decoder = state["intermediates"]["decoder"]
cross = np.stack(
    [
        decoder[f"layers_{i}"]["cross_attention"]["attention_weights"][0][0]
        for i in range(model_cfg.num_decoder_layers)
    ]
)  # [l, n, t, s]
assert np.allclose(cross.sum(-1), 1.0, atol=1e-5)


def labels(ids):
    return [tokenizer.decode([i]) or tokenizer.hf.id_to_token(i) for i in ids]


fig, axes = plt.subplots(
    1, model_cfg.num_decoder_layers, figsize=(7 * model_cfg.num_decoder_layers, 7)
)
for layer, ax in enumerate(axes):
    ax.imshow(cross[layer].mean(0), cmap="viridis")  # [t, s], mean over heads
    ax.set_xticks(range(len(src_ids)), labels(src_ids), rotation=90, fontsize=7)
    ax.set_yticks(range(len(out_ids)), labels(out_ids), fontsize=7)
    ax.set(
        title=f"decoder layer {layer}: cross-attention (mean over heads)",
        xlabel="source token",
        ylabel="output token being predicted",
    )
fig.tight_layout()

# %% [markdown]
# The heads of the last layer separately: different heads attend differently.

# %%
heads = cross[-1]  # [n, t, s]
fig, axes = plt.subplots(1, len(heads), figsize=(4 * len(heads), 4))
for head, ax in enumerate(axes):
    ax.imshow(heads[head], cmap="viridis")
    ax.set(title=f"last layer, head {head}", xticks=[], yticks=[], xlabel="source", ylabel="output")
fig.tight_layout()
