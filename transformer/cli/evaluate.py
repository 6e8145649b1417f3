"""Evaluate a GPT run, or a Hugging Face GPT-2/Llama directory, on lm-evaluation-harness tasks.

    python -m transformer.evaluate --workdir=runs/default --tasks=hellaswag --limit=100
    python -m transformer.evaluate --hf_dir=out/ --tasks=my_task --include_path=my_tasks/
    python -m transformer.evaluate --workdir=DIR --tasks=T -- --num_fewshot 5 --output_path res/

Runs lm-eval's own `run` command with this library's model backend (`--model transformer`,
`transformer.evaluation.harness`), which loads the newest checkpoint (or --step) on the run's
mesh, in its model.dtype unless --dtype says otherwise. Everything after `--` goes to lm-eval
unchanged (`lm-eval run --help` lists it; `--model_args KEY=VALUE` adds to the model arguments
this command builds). Prints lm-eval's table of metrics. Needs the eval extra:
`pip install -e ".[eval]"`. A task whose data are local files (a YAML with
`dataset_path: json` and `dataset_kwargs: {data_files: ...}` in --include_path) runs offline.

Plain `lm_eval --model transformer ...` works only in a Python process that imported
`transformer.evaluation.harness` first (lm-eval finds no models outside its own package), e.g.
`lm_eval.simple_evaluate(model="transformer", model_args="workdir=DIR", ...)` after the import;
this command is the way from a shell.
"""

from __future__ import annotations

import json
import sys
from typing import NoReturn

from absl import flags

from transformer.cli.entry import main_entry
from transformer.errors import ConfigError, require

flags.DEFINE_string("workdir", None, "Run directory of a GPT training run.")
flags.DEFINE_string("hf_dir", None, "Or: a Hugging Face GPT-2/Llama directory with tokenizer.json.")
flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the newest).")
flags.DEFINE_list("tasks", [], "lm-eval task names (or groups), comma-separated.")
flags.DEFINE_string("include_path", None, "A directory of task YAML files of your own.")
flags.DEFINE_float("limit", None, "Documents per task (below 1: that share of them).")
flags.DEFINE_integer("num_fewshot", None, "Examples in each prompt (default: the task's).")
flags.DEFINE_integer("batch_size", 32, "Sequences per forward pass (a multiple of the devices).")
flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16", "float16"], "Compute dtype (default: model.dtype)."
)
flags.DEFINE_bool("debug", False, "Show full tracebacks for errors.")
FLAGS = flags.FLAGS


def lm_eval_argv(model_name: str, passthrough: list[str]) -> list[str]:
    """The `lm-eval run` command line of these flags, then `passthrough`."""
    model_args = {"workdir": FLAGS.workdir, "hf_dir": FLAGS.hf_dir, "step": FLAGS.step}
    model_args["dtype"] = FLAGS.dtype
    argv = [
        "lm-eval",
        "run",
        "--model",
        model_name,
        "--model_args",
        json.dumps({k: v for k, v in model_args.items() if v is not None}),
        "--batch_size",
        str(FLAGS.batch_size),
    ]
    if FLAGS.tasks:
        argv += ["--tasks", ",".join(FLAGS.tasks)]
    for name in ("include_path", "limit", "num_fewshot"):
        value = getattr(FLAGS, name)
        if value is not None:
            argv += [f"--{name}", str(int(value) if name == "limit" and value >= 1 else value)]
    return argv + passthrough


def run() -> int:
    passthrough = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else []
    if not FLAGS.tasks and not {"--tasks", "-t"} & set(passthrough):
        raise ConfigError("name the tasks to run, e.g. --tasks=hellaswag (lm-eval ls tasks)")
    if FLAGS.batch_size < 1:
        raise ConfigError(f"--batch_size={FLAGS.batch_size} must be at least 1")
    # lm-eval is optional: imported here, so a missing one is a one-line error and --help works.
    harness = require("transformer.evaluation.harness", "eval", "evaluation with lm-eval")
    lm_main = require("lm_eval.__main__", "eval", "evaluation with lm-eval")
    harness.check_source(FLAGS.workdir, FLAGS.hf_dir)
    sys.argv = lm_eval_argv(harness.MODEL_NAME, passthrough)  # lm-eval's command reads these
    try:
        lm_main.cli_evaluate()
    except ValueError as e:
        if not str(e).startswith("Tasks not found"):
            raise
        raise ConfigError(
            f"lm-eval: {e}; check the names (python -m lm_eval ls tasks), or give the "
            "directory of your task YAML files with --include_path"
        ) from e
    return 0


def main() -> NoReturn:
    main_entry(run, "transformer.evaluate")
