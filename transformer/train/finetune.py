"""Parameters to fine-tune from (`checkpoint.init_from`): another run's workdir or a Hugging
Face GPT-2 or Llama directory, checked against the model being trained."""

from __future__ import annotations

from typing import Any

import jax

from transformer.errors import ConfigError
from transformer.hf import load_hf
from transformer.model.config import ADAPTER_FIELDS, ModelConfig
from transformer.model.scan import stack_layers, unstack_layers
from transformer.store.rundir import CONFIG, RunDir


def initial_params(init_from: str, model_cfg: ModelConfig) -> Any:
    """Host parameters laid out for `model_cfg` (scanned or not) from `init_from`."""
    source = RunDir(init_from)
    if source.checkpoints_path.exists():
        source_cfg, params = source.load_params()
        if source_cfg.scan_layers != model_cfg.scan_layers:
            params = (stack_layers if model_cfg.scan_layers else unstack_layers)(params)
    elif (source.path / CONFIG).exists():
        source_cfg, params = load_hf(  # GPT-2 or Llama, by config.json's model_type
            init_from, pad_vocab_to=model_cfg.vocab_size, scan_layers=model_cfg.scan_layers
        )
    else:
        raise ConfigError(
            f"checkpoint.init_from={init_from!r} is neither a run directory (with checkpoints/) "
            "nor a Hugging Face GPT-2 or Llama directory (with config.json); check the path"
        )
    # The embedding rows are compared below, with a message that names the fix; the layers'
    # layout was converted above; adapters are the run's own, on top of the base.
    ignore = ("vocab_size", "real_vocab_size", "scan_layers", *ADAPTER_FIELDS)
    differences = model_cfg.differences(source_cfg, ignore=ignore)
    if differences:
        diffs = "; ".join(
            f"model.{k}: {theirs!r} there, {mine!r} here" for k, theirs, mine in differences
        )
        flags = " ".join(f"--config.model.{k}={theirs}" for k, theirs, _ in differences)
        raise ConfigError(
            f"checkpoint.init_from={init_from} holds another model ({diffs}); use the same "
            f"model.* settings as that checkpoint: {flags}"
        )
    if model_cfg.lora_rank and model_cfg.num_classes > source_cfg.num_classes:
        raise ConfigError(
            f"the run's tokenizer has {model_cfg.num_classes - source_cfg.num_classes} tokens "
            f"that checkpoint.init_from={init_from} has no trained rows for (ids "
            f"{source_cfg.num_classes} and up: the chat tokens <|im_start|> and <|im_end|> are "
            "added when the model has no chat template), and LoRA trains no embedding rows; "
            "fine-tune in full (model.lora_rank=0) or start from a model with a chat template"
        )
    source_vocab = jax.tree.leaves(params["embed"]["token_embedding"])[0].shape[0]
    if source_vocab != model_cfg.vocab_size:
        raise ConfigError(
            f"checkpoint.init_from={init_from} has {source_vocab} embedding rows but this run's "
            f"model.vocab_size is {model_cfg.vocab_size}; fine-tune with the tokenizer "
            "of that run (data.tokenizer=gpt2 for GPT-2 weights)"
        )
    return params
