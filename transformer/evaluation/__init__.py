"""Evaluation with lm-evaluation-harness (`pip install -e ".[eval]"`): a model backend and the
tasks a training run evaluates.

  scoring   batched log-likelihoods and generation of a GPT on a device mesh (no lm-eval)
  harness   `TransformerLM`, the lm-eval `LM` registered as `transformer` on import
  tasks     `evaluate_tasks(model_cfg, params, tokenizer, tasks, ...)` -> {"eval/task/metric": x},
            `check_tasks` (a ConfigError naming unknown tasks)

The command is `python -m transformer.evaluate` (`transformer.cli.evaluate`). This layer sits
above store, inference, hf, model and data, below train. The names below load on first use, so
importing the package does not import lm-eval.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Scorer": "transformer.evaluation.scoring",
    "TransformerLM": "transformer.evaluation.harness",
    "check_tasks": "transformer.evaluation.tasks",
    "evaluate_tasks": "transformer.evaluation.tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'transformer.evaluation' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
