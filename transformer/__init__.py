"""A JAX/Flax Transformer: the paper's encoder-decoder and the decoder-only GPT.

The package in layers, lowest first; a layer imports only the layers below it:

  errors, files   every user error; the one atomic file writer
  model           ModelConfig, kernels, layers, GPT and EncoderDecoder, LoRA, sharding rules
  data            tokenizers, corpora, chat templates, token shards, batches
  store           a run directory and its checkpoints; load_run
  inference       sampling, beam search, generate/reply/translate
  hf              Hugging Face GPT-2 and Llama weights in and out; a run exported, PEFT adapters
  evaluation      the lm-evaluation-harness backend (lm-eval imported only there)
  train           run config, optimiser, steps, trainer, hooks, a whole run
  cli             the commands (`python train.py`, `python -m transformer.sample`, ...)

The names below load on first use, so `import transformer.data` does not import Flax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ConfigError": "transformer.errors",
    "ModelConfig": "transformer.model.config",
    "preset": "transformer.model.config",
    "GPT": "transformer.model.models",
    "EncoderDecoder": "transformer.model.models",
    "RunDir": "transformer.store.rundir",
    "load_run": "transformer.store.rundir",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'transformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
