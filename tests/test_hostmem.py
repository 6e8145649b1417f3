"""transformer.hostmem: when train.py keeps freed host memory, checked in fresh processes (the
malloc settings are process-wide)."""

import platform
import subprocess
import sys

import pytest


def configure_in_subprocess(env_platforms: str | None, keep: str = "None") -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    if env_platforms is not None:
        env["JAX_PLATFORMS"] = env_platforms
    code = (
        "from transformer.train import hostmem; "
        f"print(hostmem.runs_on_cpu(), hostmem.configure({keep}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc malloc settings are Linux-only")
def test_kept_on_cpu_and_when_asked():
    assert configure_in_subprocess("cpu") == "True True"
    assert configure_in_subprocess("cuda", keep="True") == "False True"


def test_not_kept_on_accelerators_or_when_declined():
    assert configure_in_subprocess("cuda") == "False False"
    assert configure_in_subprocess("tpu,cpu") == "False False"
    assert configure_in_subprocess("cpu", keep="False") == "True False"
