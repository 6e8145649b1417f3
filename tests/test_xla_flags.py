"""transformer.train.xla_flags: when train.py sets its GPU XLA flags, checked in fresh processes
with a controlled environment (a stand-in CUDA plugin on PYTHONPATH plays the GPU machine)."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

SHIPPED = "--xla_gpu_enable_latency_hiding_scheduler=true"


@pytest.fixture
def fake_cuda_plugin(tmp_path):
    """A folder that makes `jax_plugins.xla_cuda12` importable: JAX finds it, registers no
    backend, and runs on the CPU."""
    plugin = tmp_path / "jax_plugins" / "xla_cuda12"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text("def initialize():\n    pass\n")
    return tmp_path


def environment(plugin_dir=None, **values: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    path = [str(ROOT)] + ([str(plugin_dir)] if plugin_dir else [])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update({k: v for k, v in values.items() if v is not None})
    return env


def configure_in_subprocess(plugin_dir=None, **values: str | None) -> tuple[str, str]:
    """(what `configure()` returned, XLA_FLAGS afterwards) in a fresh process."""
    code = (
        "import os; from transformer.train import xla_flags; "
        "print(' '.join(xla_flags.configure())); print(os.environ.get('XLA_FLAGS', '<unset>'))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=environment(plugin_dir, **values),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    returned, flags = proc.stdout.split("\n")[:2]
    return returned, flags


def test_set_on_a_gpu_machine_when_the_user_set_none(fake_cuda_plugin):
    assert configure_in_subprocess(fake_cuda_plugin) == (SHIPPED, SHIPPED)
    assert configure_in_subprocess(fake_cuda_plugin, JAX_PLATFORMS="cuda") == (SHIPPED, SHIPPED)
    assert configure_in_subprocess(fake_cuda_plugin, JAX_PLATFORMS="cuda,cpu") == (SHIPPED,) * 2


def test_left_alone_off_gpus_and_when_the_user_set_xla_flags(fake_cuda_plugin):
    assert configure_in_subprocess() == ("", "<unset>")  # no CUDA plugin
    assert configure_in_subprocess(fake_cuda_plugin, JAX_PLATFORMS="cpu") == ("", "<unset>")
    assert configure_in_subprocess(fake_cuda_plugin, JAX_PLATFORMS="tpu") == ("", "<unset>")
    mine = "--xla_cpu_enable_fast_math=false"
    assert configure_in_subprocess(fake_cuda_plugin, XLA_FLAGS=mine) == ("", mine)
    assert configure_in_subprocess(fake_cuda_plugin, XLA_FLAGS="") == ("", "")  # set, if empty


def test_train_py_sets_them_before_jax_starts_its_backend(fake_cuda_plugin, tmp_path):
    """An unknown flag in the shipped set makes XLA abort when it starts: proof that train.py
    put the set in XLA_FLAGS before anything started JAX's backend. It says so in one line."""
    code = (
        "import sys; from transformer.train import xla_flags; "
        "xla_flags.GPU_FLAGS = ('--xla_no_such_flag=1',); "
        "from transformer.cli import train; "
        f"sys.argv = ['train.py', '--config={ROOT / 'configs/tiny.py'}', "
        f"'--workdir={tmp_path / 'run'}']; train.main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=environment(fake_cuda_plugin),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stdout.startswith("XLA_FLAGS=--xla_no_such_flag=1 (train.py's GPU default")
    assert "Unknown flag in XLA_FLAGS: --xla_no_such_flag=1" in proc.stderr
