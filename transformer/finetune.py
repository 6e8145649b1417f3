"""Parameters to fine-tune from (`checkpoint.init_from`): another run's workdir or a Hugging
Face GPT-2 or Llama directory, checked against the model being trained."""

from __future__ import annotations

from typing import Any

import jax

from transformer.config import ConfigError, ModelConfig
from transformer.rundir import CONFIG, RunDir

# Fields that change how a model is computed, not what it is: they may differ between a run
# and its resumption or its fine-tuning.
RUNTIME_MODEL_FIELDS = (
    "dtype",
    "scan_layers",
    "remat_policy",
    "attention_impl",
    "kernels",
    "dropout_rate",
    "attention_dropout_rate",
    "loss_chunk_len",
)


def initial_params(init_from: str, model_cfg: ModelConfig) -> Any:
    """Host parameters laid out for `model_cfg` (scanned or not) from `init_from`."""
    source = RunDir(init_from)
    if source.checkpoints_path.exists():
        source_cfg, params = source.load_params()
        if source_cfg.scan_layers != model_cfg.scan_layers:
            from transformer.scan_layers import stack_layers, unstack_layers

            params = (stack_layers if model_cfg.scan_layers else unstack_layers)(params)
    elif (source.path / CONFIG).exists():
        from transformer.convert import load_hf  # GPT-2 or Llama, by config.json's model_type

        source_cfg, params = load_hf(
            init_from, pad_vocab_to=model_cfg.vocab_size, scan_layers=model_cfg.scan_layers
        )
    else:
        raise ConfigError(
            f"checkpoint.init_from={init_from!r} is neither a run directory (with checkpoints/) "
            "nor a Hugging Face GPT-2 or Llama directory (with config.json); check the path"
        )
    ignored = (*RUNTIME_MODEL_FIELDS, "vocab_size", "init_std")
    # num_kv_heads 0 means num_heads: compare the heads each model really has.
    theirs = {**source_cfg.to_dict(), "num_kv_heads": source_cfg.kv_heads}
    mine = {**model_cfg.to_dict(), "num_kv_heads": model_cfg.kv_heads}
    diffs = [
        f"model.{k}: {theirs[k]!r} there, {mine[k]!r} here"
        for k in mine
        if k not in ignored and theirs.get(k) != mine[k]
    ]
    if diffs:
        raise ConfigError(
            f"checkpoint.init_from={init_from} holds another model ({'; '.join(diffs)}); use "
            "the same model.* settings as that checkpoint"
        )
    source_vocab = jax.tree.leaves(params["embed"]["token_embedding"])[0].shape[0]
    if source_vocab != model_cfg.vocab_size:
        raise ConfigError(
            f"checkpoint.init_from={init_from} has {source_vocab} embedding rows but this run's "
            f"model.vocab_size is {model_cfg.vocab_size}; fine-tune with the tokenizer "
            "of that run (data.tokenizer=gpt2 for GPT-2 weights)"
        )
    return params
