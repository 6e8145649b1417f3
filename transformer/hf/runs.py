"""A training run exported as a Hugging Face directory: the weights (LoRA adapters merged), the
config, the tokenizer files and the chat template, which `from_pretrained` loads as they are;
or the LoRA adapters alone as a PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`)
that `peft` loads onto the base model.

    python -m transformer.export --workdir=runs/sft --out=exported/sft            # merged
    python -m transformer.export --workdir=runs/sft --out=exported/sft --adapter  # PEFT
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from transformer.data.chat import ChatFormat
from transformer.errors import ConfigError, ConvertError, require
from transformer.files import write_text_atomic
from transformer.hf import export_hf, family_for
from transformer.hf.engine import adapter_tensors
from transformer.hf.tokenizer import export_tokenizer
from transformer.model import lora
from transformer.model.config import ModelConfig
from transformer.store.rundir import RunDir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE = "base"  # where --adapter writes the base model when the run has no Hugging Face one


def export_run(
    workdir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    adapter: bool = False,
    step: int | None = None,
) -> Path:
    """Exports the run in `workdir` (its newest good checkpoint, or `step`) to `out_dir`:
    merged weights, or with `adapter` a PEFT adapter. Returns `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; give the directory to export into (--out)")
    run = RunDir(workdir)
    cfg, params, tokenizer = run.load(step)
    chat = run.load_chat()
    if adapter:
        _export_adapter(run, cfg, params, out)
    else:
        _export_model(cfg, params, tokenizer, out, chat)
    export_tokenizer(tokenizer, out, max_len=cfg.max_len, chat=chat)
    return out


def _export_model(
    cfg: ModelConfig, params: Any, tokenizer: Any, out: Path, chat: ChatFormat | None
) -> None:
    """The weights with every adapter folded in, vocabulary padding dropped; a chat run's
    end-of-turn token is the EOS `generate` stops at."""
    merged_cfg, merged = lora.merge(cfg, params)
    eos_id = tokenizer.eos_id if chat is None else tokenizer.hf.token_to_id(chat.end_of_turn)
    export_hf(
        merged_cfg,
        merged,
        out,
        vocab_size=cfg.num_classes,
        bos_token_id=tokenizer.bos_id,
        eos_token_id=eos_id,
    )


def _export_adapter(run: RunDir, cfg: ModelConfig, params: Any, out: Path) -> None:
    """The run's adapters as a PEFT adapter for the base model it started from."""
    if not cfg.lora_rank:
        raise ConvertError(
            f"the run in {run.path} has no LoRA adapters (model.lora_rank=0); export its "
            "weights without --adapter"
        )
    base = _base_model(run, cfg, params, out)
    write_peft_adapter(cfg, params, out, base_model=str(base))


def write_peft_adapter(cfg: ModelConfig, params: Any, out: str | os.PathLike, *, base_model: str):
    """`adapter_config.json` and `adapter_model.safetensors` of the LoRA adapters in `params`,
    as `peft` saves them, for the Hugging Face model at `base_model`."""
    family = family_for(cfg)
    tensors, modules = adapter_tensors(family, cfg, params)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.lora_rank,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": family.name == "gpt2",  # GPT-2's Conv1D keeps its weights [in, out]
        "inference_mode": True,
    }
    safetensors_numpy = require("safetensors.numpy")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    safetensors_numpy.save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    write_text_atomic(out / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


def _base_model(run: RunDir, cfg: ModelConfig, params: Any, out: Path) -> Path:
    """The directory of the model the adapters apply to."""
    init_from = run.read_config().get("checkpoint", {}).get("init_from", "")
    source = Path(init_from).expanduser() if init_from else None
    if source is not None and (source / "config.json").is_file():
        return source.resolve()
    _, base_params = lora.split_trainable(params)
    base_dir = out / BASE
    tokenizer = run.load_tokenizer()
    _export_model(cfg, base_params, tokenizer, base_dir, run.load_chat())
    export_tokenizer(tokenizer, base_dir, max_len=cfg.max_len, chat=run.load_chat())
    return base_dir.resolve()
