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
# # 3. Train a GPT, stop, resume, sample
#
# The training loop that `python train.py` runs is one library function,
# `transformer.train.run.train_and_evaluate(config, workdir)`. This notebook calls it directly:
#
# 1. loads `configs/default.py` (a small character-level GPT-2 on Shakespeare),
# 2. trains to half way and stops (`config.train.stop_at_step`), as a killed job would,
# 3. plots the loss curves from the workdir's `metrics.jsonl`,
# 4. resumes from the checkpoint with a fresh model object and checks that the curve
#    continues where it stopped,
# 5. samples text at different temperatures and with top-k filtering.
#
# The model is the decoder of "Attention Is All You Need" (sec. 3.1) without cross-attention,
# in GPT-2's variant: pre-norm residual blocks, GELU, learned positions. Full mode trains the
# default config as `python train.py` would (about ten minutes on two CPU cores); quick mode
# (`TRANSFORMER_NOTEBOOK_QUICK=1`) trains a tiny model for a few steps.

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

from transformer import GPT, load_run
from transformer.inference import generate
from transformer.inference.decode import top_k_filter
from transformer.train.metrics import read_metrics
from transformer.train.run import train_and_evaluate

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs").is_dir())
print("quick mode" if QUICK else "full mode", "| devices:", jax.devices())

# %% [markdown]
# ## The config
#
# Configs are Python files with a `get_config()` that returns an `ml_collections.ConfigDict`;
# `train.py` loads them with `ml_collections.config_flags`, a notebook can simply import the
# file. Any field can be changed before training, as `--config.train.num_steps=...` would.

# %%
spec = importlib.util.spec_from_file_location("default_config", ROOT / "configs" / "default.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
config.train.sample_tokens = 0  # we sample below instead
if QUICK:
    config.model.update(d_model=32, num_heads=4, d_ff=64, num_decoder_layers=2, max_len=64)
    config.data.seq_len = 64
    config.train.update(num_steps=60, warmup_steps=10, log_every_steps=10)
    config.train.update(eval_every_steps=30, eval_batches=2, peak_flops=1e11)
    config.checkpoint.every_steps = 30

print("model:", dict(config.model))
print(
    "train:", {k: config.train[k] for k in ("num_steps", "batch_size", "learning_rate", "schedule")}
)
print("data:", dict(config.data))

NUM_STEPS = config.train.num_steps
STOP = NUM_STEPS // 2  # a multiple of log_every_steps, so the last record before it is at STOP
LOG = config.train.log_every_steps
workdir = tempfile.mkdtemp() if QUICK else str(ROOT / "runs" / "notebooks" / "03_train_a_gpt")
shutil.rmtree(workdir, ignore_errors=True)  # start afresh: an existing run would be resumed

# %% [markdown]
# ## Train half way
#
# `stop_at_step` ends the run early with a checkpoint, like a job that is pre-empted (the loop
# also saves on SIGTERM and SIGINT). The learning-rate schedule still spans `num_steps`.

# %%
config.train.stop_at_step = STOP
first = train_and_evaluate(config, workdir)
assert first.stopped_early and int(first.state.step) == STOP
print(sorted(os.listdir(workdir)))

# %% [markdown]
# The workdir now holds the resolved `config.json`, the `tokenizer.json`, Orbax checkpoints
# (parameters, optimizer state, RNG and the data iterator's position) and `metrics.jsonl`,
# one JSON object per logged step.

# %%
records = read_metrics(workdir)
print(records[-1])


def plot_losses(ax, records, **style):
    steps = [r["step"] for r in records]
    ax.plot(steps, [r["train_loss"] for r in records], "-", label="train", **style)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), "o--", label="validation", **style)
    ax.set(xlabel="step", ylabel="cross-entropy (nats per character)")


fig, ax = plt.subplots(figsize=(7, 3.5))
plot_losses(ax, records)
ax.set(xlim=(0, NUM_STEPS), title=f"stopped at step {STOP}")
ax.legend()
plt.show()

# %% [markdown]
# ## Resume
#
# Calling `train_and_evaluate` again on the same workdir builds everything anew (model, optimizer,
# data pipeline, jitted step), finds the newest checkpoint and continues from it: parameters,
# Adam moments, step counter, RNG and the data iterator's position come back, so the run is the
# one an uninterrupted job would have produced.

# %%
config.train.stop_at_step = 0  # 0 = run to num_steps
second = train_and_evaluate(config, workdir)
assert not second.stopped_early and int(second.state.step) == NUM_STEPS

records = read_metrics(workdir)
before = [r for r in records if r["step"] <= STOP]
after = [r for r in records if r["step"] > STOP]

fig, ax = plt.subplots(figsize=(7, 3.5))
plot_losses(ax, before, color="C0")
plot_losses(ax, after, color="C1")
ax.axvline(STOP, color="grey", linestyle=":")
ax.set(title="first run (blue), resumed run (orange)")
print(
    f"last record before the stop: step {before[-1]['step']}, loss {before[-1]['train_loss']:.4f}"
)
print(f"first record after resuming: step {after[0]['step']}, loss {after[0]['train_loss']:.4f}")

# %% [markdown]
# The resumed curve continues the first: the next logged step follows the stop, every step is
# logged once, and the loss picks up where it was (a run restarted from scratch would jump back
# towards the loss of the first steps).

# %%
steps = [r["step"] for r in records]
assert steps == list(range(LOG, NUM_STEPS + 1, LOG)), steps  # no gap, no repeat
assert before[-1]["step"] == STOP and after[0]["step"] == STOP + LOG
assert abs(after[0]["train_loss"] - before[-1]["train_loss"]) < 0.3
assert after[0]["train_loss"] < records[0]["train_loss"] - 0.2  # not back at the start

# %% [markdown]
# Resumption is exact, not just close. To see it, run the same config without interruption up
# to the first record after the stop and compare the logged losses bit for bit. In full mode
# this costs another half run; set `CHECK_EXACT = True` to do it anyway.

# %%
CHECK_EXACT = QUICK
if CHECK_EXACT:
    straight_dir = tempfile.mkdtemp()
    config.train.stop_at_step = STOP + LOG
    train_and_evaluate(config, straight_dir)
    config.train.stop_at_step = 0
    straight = read_metrics(straight_dir)
    for key in ("train_loss", "val_loss", "grad_norm"):
        resumed = [r.get(key) for r in records if r["step"] <= STOP + LOG]
        assert [r.get(key) for r in straight] == resumed, key
    print("the resumed run logged exactly the losses of the uninterrupted run")

# %% [markdown]
# ## Sampling
#
# `load_run` returns `(model config, parameters, tokenizer)` from the newest checkpoint of a
# workdir; `generate` continues prompts with a KV cache. At each step the next token is drawn
# from `softmax(logits / temperature)`: a low temperature sharpens the distribution towards
# the most likely character (0 is greedy argmax), a high one flattens it. Top-k keeps only the
# `k` most likely tokens (`transformer.inference.decode.top_k_filter`), cutting off the long tail of
# unlikely characters that a high temperature inflates.
#
# Greedy decoding tends to loop on the most likely phrases; sampling brings variety, and more
# misspellings as the temperature rises; top-k keeps the variety with fewer of them.

# %%
model_cfg, params, tokenizer = load_run(workdir)
line = "JULIET:\nO Romeo, Romeo! wherefore art th"
tokens = jnp.asarray([tokenizer.encode(line)])  # [1, t]
logits = GPT(model_cfg).apply({"params": params}, tokens)[0, -1, : tokenizer.vocab_size]  # [v]
top = np.argsort(-np.asarray(logits))[:12]
names = [repr(tokenizer.decode([i]))[1:-1] or repr(tokenizer.hf.id_to_token(int(i))) for i in top]

panels = [(0.5, 0), (1.0, 0), (2.0, 0), (2.0, 3)]  # (temperature, top_k)
fig, axes = plt.subplots(1, len(panels), figsize=(16, 3), sharey=True)
for ax, (temperature, top_k) in zip(axes, panels, strict=True):
    probs = np.asarray(jax.nn.softmax(top_k_filter(logits / temperature, top_k)))
    ax.bar(range(len(top)), probs[top])
    ax.set_xticks(range(len(top)), names)
    ax.set(title=f"temperature {temperature}" + (f", top-k {top_k}" if top_k else ""))
axes[0].set(ylabel="p(next character)")
fig.suptitle(f"the next character after {line!r}")
fig.tight_layout()

# %%
prompt = "ROMEO:\n"
max_new = 40 if QUICK else 300  # past max_len, it continues from the last half of the context
settings = [(0.0, 0), (1.0, 0), (1.0, 5)]
if not QUICK:
    settings = [(0.0, 0), (0.5, 0), (0.8, 0), (1.2, 0), (1.2, 5)]
for temperature, top_k in settings:
    text = generate(
        model_cfg,
        params,
        tokenizer,
        [prompt],
        max_new_tokens=max_new,
        temperature=temperature,
        top_k=top_k,
        seed=0,
    )[0]
    print(f"--- temperature {temperature}, top_k {top_k or 'off'} ---\n{prompt}{text}\n")
