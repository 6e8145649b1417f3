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
# # 7. Fine-tuning on instructions: LoRA against full fine-tuning
#
# What most people do with a pretrained model is fine-tune it on prompt/answer pairs and score
# it on a standard task. This notebook does all of it on a machine without a GPU:
#
# 1. pretrain a small Llama-style character model on Shakespeare and export it as a Hugging
#    Face directory (the kind of model you would download), with a chat template of its own;
# 2. make a small instruction set (`instruct:` records: `{"prompt", "completion"}`);
# 3. fine-tune the directory twice on it, with LoRA adapters (only they train) and in full,
#    the loss on the answers only;
# 4. compare the answers, an lm-evaluation-harness score on a local multiple-choice task, the
#    optimizer state, the step's memory and the speed.
#
# It needs the `hf` and `eval` extras (`pip install -e ".[hf,eval]"`). Full mode takes about
# 6 minutes on two CPU cores; quick mode (`TRANSFORMER_NOTEBOOK_QUICK=1`) runs the same cells
# with a tiny model and a few steps, whose numbers mean nothing.

# %%
import os

QUICK = os.environ.get("TRANSFORMER_NOTEBOOK_QUICK") == "1"  # CI: small sizes, same code

import json
import shutil
import statistics
import tempfile
from pathlib import Path

import jax
import numpy as np

from transformer.data.chat import ChatFormat
from transformer.evaluation import evaluate_tasks
from transformer.hf.runs import export_run
from transformer.inference import reply
from transformer.model import lora
from transformer.model.sharding import global_batch
from transformer.store.rundir import RunDir
from transformer.train.config import load_config_file
from transformer.train.metrics import count_params, read_metrics
from transformer.train.run import train_and_evaluate

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "configs").is_dir())
WORK = Path(tempfile.mkdtemp()) if QUICK else ROOT / "runs" / "notebooks" / "07"
shutil.rmtree(WORK, ignore_errors=True)
WORK.mkdir(parents=True)
print("quick mode" if QUICK else "full mode", "| devices:", jax.devices(), "| work in", WORK)


def load_config(name):
    return load_config_file(ROOT / "configs" / f"{name}.py")


# %% [markdown]
# ## 1. A pretrained model, as a Hugging Face directory
#
# `configs/llama_shakespeare.py` is a Llama-style decoder (rotary positions, SwiGLU, RMSNorm,
# grouped-query attention) on the characters of Shakespeare. `export_run` writes it as
# `transformers` would save a `LlamaForCausalLM`: `config.json`, `model.safetensors`,
# `tokenizer.json` and `tokenizer_config.json`.
#
# A pretrained model's `tokenizer_config.json` often carries a `chat_template`: a Jinja
# template that turns a list of messages into the text the model was tuned on. We give ours a
# plain-text one, `Q: ...` then `A: ...` ending with the EOS token. Fine-tuning renders every
# record with it exactly as `transformers`' `apply_chat_template` would, and learns only the
# tokens of the answers and their EOS. (Without a template the library uses ChatML and adds
# its `<|im_start|>` and `<|im_end|>` tokens to the vocabulary.)

# %%
PRETRAIN_STEPS = 30 if QUICK else 600
SMALL = dict(d_model=64, num_heads=4, num_kv_heads=2, d_ff=128, num_decoder_layers=2)

config = load_config("llama_shakespeare")
if QUICK:
    config.model.update(SMALL)
    config.train.update(eval_batches=2, warmup_steps=5)
config.model.update(max_len=128)
config.data.seq_len = 128
config.train.update(num_steps=PRETRAIN_STEPS, eval_every_steps=PRETRAIN_STEPS, sample_tokens=0)
config.train.log_every_steps = max(PRETRAIN_STEPS // 10, 1)
config.checkpoint.every_steps = PRETRAIN_STEPS
pretrained = train_and_evaluate(config, str(WORK / "pretrain"))
print("validation loss", pretrained.metrics["val_loss"])

BASE = WORK / "base_model"
export_run(WORK / "pretrain", BASE)
TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ 'Q: ' + m['content'] + '\\n' }}"
    "{% elif m['role'] == 'assistant' %}{{ 'A: ' + m['content'] + eos_token + '\\n' }}"
    "{% else %}{{ m['content'] + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'A: ' }}{% endif %}"
)
tokenizer_config = json.loads((BASE / "tokenizer_config.json").read_text())
tokenizer_config["chat_template"] = TEMPLATE
(BASE / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
print(sorted(p.name for p in BASE.iterdir()))
print(ChatFormat.from_model_dir(BASE).end_of_turn, "ends an answer")

# %% [markdown]
# ## 2. An instruction set
#
# One skill a character model can pick up in a few hundred steps: repeat a word of the play a
# given number of times. 90% of the pairs train, the last 10% are held out for the validation
# loss; a multiple-choice version of the held-out words becomes an lm-eval task below.

# %%
WORDS = "love night death king queen sword crown heart blood lord lady fair day".split()
COUNTS = {"once": 1, "twice": 2, "three times": 3}
rng = np.random.default_rng(0)
pairs = []
for _ in range(400):
    word, (said, n) = rng.choice(WORDS), list(COUNTS.items())[rng.integers(3)]
    pairs.append({"prompt": f"Say {word} {said}.", "completion": " ".join([word] * n) + "."})
DATA = WORK / "instructions.jsonl"
DATA.write_text("".join(json.dumps(p) + "\n" for p in pairs))
print(len(pairs), "pairs, e.g.", pairs[0], pairs[1])

# %% [markdown]
# The lm-eval task: each question is a prompt rendered with the template, the choices are four
# answers (the right one, a wrong count, a wrong word, both wrong). lm-eval scores a choice by
# its log-likelihood after the question, so no choice may be the beginning of another ("crown"
# would score as well as "crown crown"): the answers end with a full stop. `dataset_path: json`
# over a local file runs offline.

# %%
TASKS = WORK / "tasks"
TASKS.mkdir()
docs = []
for i in range(24):
    word, other = WORDS[i % len(WORDS)], WORDS[(i + 5) % len(WORDS)]
    said, n = list(COUNTS.items())[i % 3]
    m = n % 3 + 1
    choices = [" ".join([w] * k) + "." for w, k in ((word, n), (word, m), (other, n), (other, m))]
    order = rng.permutation(4)
    docs.append(
        {
            "question": f"Q: Say {word} {said}.\nA:",
            "choices": [" " + choices[j] for j in order],
            "answer": int(np.flatnonzero(order == 0)[0]),
        }
    )
(TASKS / "repeat.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
(TASKS / "repeat.yaml").write_text(
    "task: repeat_mc\ndataset_path: json\n"
    f"dataset_kwargs:\n  data_files:\n    test: {TASKS / 'repeat.jsonl'}\n"
    "test_split: test\noutput_type: multiple_choice\n"
    "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
    "metric_list:\n  - metric: acc\n"
)


def score(model_cfg, params, tokenizer):
    """lm-eval's accuracy on the local task."""
    metrics = evaluate_tasks(
        model_cfg, params, tokenizer, ["repeat_mc"], include_path=str(TASKS), batch_size=8
    )
    return metrics["eval/repeat_mc/acc"]


# %% [markdown]
# ## 3. Fine-tuning: LoRA and full
#
# `configs/sft_lora.py` is the recipe: `checkpoint.init_from` the model directory,
# `data.tokenizer=hf` with its `tokenizer.json` (the chat template comes with it), the corpus
# `instruct:FILE`, and rank-8 adapters on every projection. The model fields must be the
# directory's (`transformer.hf.config_from_hf` reads them from `config.json`). The full
# fine-tuning run is the same config with `model.lora_rank=0`. Adapters take a larger learning
# rate than full fine-tuning, the more so on a model this small: 3e-3 against 5e-4.

# %%
from transformer.hf import config_from_hf  # noqa: E402

FINETUNE_STEPS = 20 if QUICK else 300
base_fields = config_from_hf(json.loads((BASE / "config.json").read_text())).to_dict()
# The shape of the model; the vocabulary comes from the tokenizer, the adapters from the recipe.
base_fields = {
    k: v
    for k, v in base_fields.items()
    if k not in ("vocab_size", "real_vocab_size") and not k.startswith("lora_")
}


def finetune(name, **model):
    config = load_config("sft_lora")
    config.model.update(base_fields)
    config.model.update(dtype="float32", lora_dropout=0.0, **model)
    config.checkpoint.init_from = str(BASE)
    config.data.update(tokenizer_path=str(BASE / "tokenizer.json"), corpus=f"instruct:{DATA}")
    config.data.update(seq_len=64, cache_dir=str(WORK / "cache"))
    config.train.update(batch_size=16, num_steps=FINETUNE_STEPS, warmup_steps=10)
    config.train.update(eval_every_steps=FINETUNE_STEPS, eval_batches=0, sample_tokens=0)
    config.train.update(log_every_steps=max(FINETUNE_STEPS // 10, 1))
    if model.get("lora_rank", config.model.lora_rank):
        config.train.update(learning_rate=3e-3, min_learning_rate=3e-4)
    else:
        config.train.update(learning_rate=5e-4, min_learning_rate=5e-5)
    config.checkpoint.every_steps = FINETUNE_STEPS
    return train_and_evaluate(config, str(WORK / name))


runs = {"LoRA rank 8": finetune("lora"), "full": finetune("full", lora_rank=0)}
for name, run in runs.items():
    print(f"{name}: validation loss on the answers {run.metrics['val_loss']:.3f}")

# %% [markdown]
# ## 4. Before and after
#
# `reply` renders a conversation with the template, adds the generation prompt (`A: `) and
# generates greedily up to the end-of-turn token. The base model has never seen a question;
# the fine-tuned ones answer. lm-eval's accuracy on the held-out multiple-choice task says the
# same in a number (chance is 0.25).

# %%
chat = ChatFormat.from_model_dir(BASE)
base_cfg, base_params, base_tokenizer = RunDir(WORK / "pretrain").load()
questions = [[{"role": "user", "content": q}] for q in ("Say crown twice.", "Say night once.")]
models = {"base": (base_cfg, base_params, base_tokenizer)}
models.update({name: RunDir(WORK / name.split()[0].lower()).load() for name in runs})
scores = {}
for name, (model_cfg, params, tokenizer) in models.items():
    answers = reply(
        model_cfg, params, tokenizer, chat, questions, max_new_tokens=40, temperature=0.0
    )
    scores[name] = score(model_cfg, params, tokenizer)
    print(f"{name:12s} acc {scores[name]:.2f} |", " | ".join(repr(a) for a in answers))

# %% [markdown]
# ## 5. What LoRA saves
#
# With adapters only they are differentiated and updated: Adam's two moments exist for them
# alone, and the base weights stay exactly as they were (they could even be stored in
# bfloat16). XLA's memory of the compiled step (its arguments, outputs and temporaries, less
# what is updated in place) and the measured tokens per second complete the picture.
#
# At 2.5M parameters the optimizer state is a small part of a step's memory; the activations
# are most of it, and the adapters add their own (each adapted projection keeps its low-rank
# product for the backward pass), so the LoRA step can even need a little more. The saving
# grows with the model: on the 135M-parameter `smollm_135m` shape `benchmarks/lora_finetune.py`
# measures 18.6 MiB of optimizer state against 1,026 MiB and 0.85x the step memory.


# %%
def nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def step_memory(run):
    trainer = run.trainer
    batch = global_batch(next(run.data.train_iter), trainer.mesh)
    with trainer.within_mesh():
        stats = trainer.train_step.lower(trainer.abstract_state, batch).compile()
        stats = stats.memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


rows = []
for name, run in runs.items():
    records = read_metrics(WORK / name.split()[0].lower())
    trainable, _ = lora.split_trainable(run.state.params)  # the adapters, or everything
    rows.append(
        (
            name,
            f"{count_params(trainable):,} of {count_params(run.state.params):,}",
            f"{nbytes(run.state.opt_state) / 2**20:.2f} MiB",
            f"{step_memory(run) / 2**20:.1f} MiB",
            f"{statistics.median(r['tokens_per_sec'] for r in records[1:]):,.0f}",
            f"{scores[name]:.2f}",
        )
    )
header = ("", "trained parameters", "optimizer state", "step memory", "tokens/s", "lm-eval acc")
widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
for row in (header, *rows):
    print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))

# %% [markdown]
# ## 6. Back to Hugging Face
#
# `python -m transformer.export --workdir=DIR --out=OUT` (here `export_run`) writes the LoRA run
# with its adapters merged into the weights, and the template in `tokenizer_config.json`:
# `AutoModelForCausalLM.from_pretrained(OUT)` and `apply_chat_template` take it from there.
# With `--adapter` it writes only the adapters, as a PEFT adapter for the base directory.

# %%
merged = export_run(WORK / "lora", WORK / "exported")
adapter = export_run(WORK / "lora", WORK / "adapter", adapter=True)
print(sorted(p.name for p in merged.iterdir()))
print(sorted(p.name for p in adapter.iterdir()))
print(json.loads((adapter / "adapter_config.json").read_text())["target_modules"][:4], "...")
