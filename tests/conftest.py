"""Test set-up: 8 simulated CPU devices, so every sharding path runs without accelerators, one
compilation cache for the session, and the helpers the test files share (running train.py and
other commands in subprocesses, reading a run's metrics).

Many tests train the same tiny models in fresh processes (resume, faults, two hosts, the command
line, notebooks); JAX's persistent compilation cache, in a directory private to this session and
inherited by every subprocess, lets the second of them load the compiled steps instead of
compiling them again. The cache is keyed by the full program, so results are unchanged.
"""

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# Must happen before JAX is imported anywhere in the test session.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="transformer-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

# ---------------------------------------------------------------------------------------------
# Helpers the test files share (`from conftest import ROOT, train, ...`).

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, configs/, notebooks/


def device_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment with `devices` simulated CPU devices (and `extra`)."""
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **extra,
    }


def run_python(*args, devices: int = 1, env=None, timeout: float = 300, check: bool = False):
    """`python ARGS` in the repository root with `devices` simulated CPU devices; the
    CompletedProcess (stdout and stderr as text). `check`: fail the test on a non-zero exit."""
    proc = subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        env=env or device_env(devices),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def train_command(workdir, *overrides, config: str = "configs/tiny.py") -> list[str]:
    """The train.py command line of a run of `config` (tiny by default) in `workdir`."""
    return [str(ROOT / "train.py"), f"--config={config}", f"--workdir={workdir}", *overrides]


def train(
    workdir,
    *overrides,
    config: str = "configs/tiny.py",
    check: bool = True,
    devices: int = 1,
    env=None,
    timeout=300,
):
    """`python train.py --config=CONFIG --workdir=WORKDIR OVERRIDES` run to its end."""
    command = train_command(workdir, *overrides, config=config)
    return run_python(*command, devices=devices, env=env, timeout=timeout, check=check)


def read_metrics(workdir) -> list[dict]:
    """The records of a run's metrics.jsonl."""
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]
