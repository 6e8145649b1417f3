"""Train a model, or resume the run in --workdir.

  python train.py                                   # configs/default.py into runs/default
  python train.py --config=configs/NAME.py --workdir=DIR --config.train.num_steps=100

Every config field can be overridden with --config.SECTION.FIELD=VALUE; unknown fields,
wrong types and impossible values are rejected before anything is written (--help lists the
fields). Running the same command again resumes from the newest checkpoint.
Multi-host: the same command on every host (TPU pods and SLURM are detected), or pass
--coordinator_address, --num_processes and --process_id. On an NVIDIA GPU, an unset XLA_FLAGS
gets the GPU flags of transformer/train/xla_flags.py (set XLA_FLAGS, even empty, to choose).
"""

from __future__ import annotations

import os
from typing import NoReturn

import jax
from absl import flags
from ml_collections import config_flags

from transformer.cli.entry import main_entry
from transformer.cli.flags import DEFAULT_CONFIG
from transformer.train import distributed, hostmem, xla_flags
from transformer.train.config import RunConfig
from transformer.train.run import train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Run config file (configs/*.py).")
flags.DEFINE_string("workdir", None, "Run directory; default runs/<config name>.")
flags.DEFINE_bool("debug", False, "Show full tracebacks for errors.")
flags.DEFINE_string("coordinator_address", None, "Multi-host: host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
flags.DEFINE_bool(
    "keep_host_memory",
    None,
    "Keep freed host memory mapped between steps (faster on CPU; see "
    "transformer/train/hostmem.py). Default: on when JAX_PLATFORMS names cpu first, or no "
    "GPU/TPU backend is installed.",
)


def run() -> int:
    run_cfg = RunConfig.from_any(FLAGS.config)  # every value checked before anything is written
    hostmem.configure(FLAGS.keep_host_memory)  # before JAX starts its threads
    gpu_flags = xla_flags.configure()  # before JAX starts its backend, which reads XLA_FLAGS
    if gpu_flags:
        print(f"XLA_FLAGS={' '.join(gpu_flags)} (train.py's GPU default; set XLA_FLAGS to choose)")
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    workdir = FLAGS.workdir
    if workdir is None:
        name = os.path.splitext(os.path.basename(FLAGS["config"].config_filename))[0]
        workdir = os.path.join("runs", name)
        print(f"no --workdir given: using {workdir}", flush=True)
    result = train_and_evaluate(run_cfg, workdir)
    if not (result.stopped_early or result.finished_before) and jax.process_index() == 0:
        report = result.final_report()
        if report:
            print(f"\n{report}", flush=True)
    return 0


def main() -> NoReturn:
    main_entry(run, "train.py")
