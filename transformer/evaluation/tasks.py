"""Running lm-eval tasks on a model in memory, for training's evaluation steps
(`train.eval_tasks`) and for notebooks:

    metrics = evaluate_tasks(model_cfg, params, tokenizer, ["my_task"], include_path="tasks/",
                             limit=100, mesh=trainer.mesh)
    # {"eval/my_task/acc": 0.41, "eval/my_task/acc_norm": 0.44}

Tasks are looked up in `include_path` alone when they are all there (quick), else in lm-eval's
own index too (thousands of files, about ten seconds); either index is built once per process.
Tasks with local data files run offline.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from numbers import Real
from typing import Any

from jax.sharding import Mesh

from transformer.data.tokenizer import Tokenizer
from transformer.errors import ConfigError, require
from transformer.evaluation.harness import DEFAULT_BATCH_SIZE, TransformerLM
from transformer.model.config import ModelConfig

_PURPOSE = "evaluation with lm-evaluation-harness"
lm_eval = require("lm_eval", "eval", _PURPOSE)
lm_tasks = require("lm_eval.tasks", "eval", _PURPOSE)

log = logging.getLogger(__name__)

PREFIX = "eval"  # metric names: eval/<task>/<metric>


@functools.cache
def task_manager(include_path: str | None, names: tuple[str, ...]) -> Any:
    """An lm-eval `TaskManager` that knows `names`: `include_path`'s tasks alone if they are all
    there, else lm-eval's built-in tasks as well."""
    if include_path is not None:
        local = lm_tasks.TaskManager(include_path=include_path, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return lm_tasks.TaskManager(include_path=include_path)


def check_tasks(tasks: Sequence[str], include_path: str | None = None) -> None:
    """A ConfigError naming the tasks lm-eval does not know (training checks them at start)."""
    names = tuple(tasks)
    if not names:
        raise ConfigError("name at least one lm-eval task to evaluate")
    unknown = sorted(set(names) - set(task_manager(include_path, names).all_tasks))
    if unknown:
        where = f" or in {include_path}" if include_path else ""
        raise ConfigError(
            f"lm-eval has no task {', '.join(unknown)} among its own{where}; check the names "
            "(python -m lm_eval ls tasks) or give the directory of your task YAML files"
        )


def flat_metrics(results: dict[str, Any], prefix: str = PREFIX) -> dict[str, float]:
    """lm-eval's `results["results"]` as `{prefix/task/metric: value}`: the metrics (keys
    'metric,filter') without standard errors; one under a filter other than 'none' is
    `metric_filter`."""
    flat = {}
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, comma, filter_name = key.partition(",")  # metrics are "metric,filter"
            if not comma or "_stderr" in metric or not isinstance(value, Real):
                continue  # names, sample counts, standard errors
            name = metric if filter_name == "none" else f"{metric}_{filter_name}"
            flat[f"{prefix}/{task}/{name}"] = float(value)
    return flat


def evaluate_tasks(
    model_cfg: ModelConfig,
    params: Any,
    tokenizer: Tokenizer,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    limit: int | float | None = None,
    mesh: Mesh | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    num_fewshot: int | None = None,
) -> dict[str, float]:
    """Runs lm-eval `tasks` on a GPT in memory and returns `{"eval/<task>/<metric>": value}`.

    `params` may already sit on `mesh` (a training run's state; they are not copied then);
    `limit` caps the documents per task (a fraction: that share of them). The compiled
    programs are kept for the next call with the same model config and mesh.
    """
    names = tuple(tasks)
    check_tasks(names, include_path)
    lm = TransformerLM.from_model(model_cfg, params, tokenizer, mesh=mesh, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(names),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager(include_path, names),
        log_samples=False,
        bootstrap_iters=0,  # no standard errors: they are not logged
        torch_random_seed=None,  # the model is JAX: do not import torch into a training run
    )
    return flat_metrics(results or {})
