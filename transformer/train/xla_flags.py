"""XLA flags that `train.py` sets when JAX will run on an NVIDIA GPU.

XLA reads XLA_FLAGS once, when JAX starts its backend (the first `jax.devices()` or
computation), so they must be in the environment before that. `configure()` adds `GPU_FLAGS`
there when a CUDA plugin for JAX is installed, JAX_PLATFORMS does not name the CPU first, and
the user has not set XLA_FLAGS (set to anything, even empty, it is theirs and left alone).
The GPU flags parse on every platform, so a CUDA plugin on a machine without a GPU is harmless.

Which flags to ship is measured: `benchmarks/xla_flags.py` (the `flags` stage of
`benchmarks/gpu_check.sh`) times the shipped step under each candidate set against XLA's
defaults.
"""

from __future__ import annotations

import os
import pkgutil

# The latency-hiding scheduler overlaps collectives and copies with compute (docs/scaling.md
# recommends it for GPUs). The flags stage of gpu_check.sh decides the rest: cuBLASLt matmuls,
# cuDNN layer norm, and command buffers (CUDA graphs) off were the candidates in its first run.
GPU_FLAGS: tuple[str, ...] = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (`jax_plugins.xla_cuda12`, `xla_cuda13`, ...) is installed,
    found without importing it or starting any backend."""
    try:
        import jax_plugins  # namespace package of the CUDA and ROCm plugins
    except ImportError:
        return False
    return any("cuda" in m.name for m in pkgutil.iter_modules(jax_plugins.__path__))


def runs_on_gpu() -> bool:
    """Whether JAX will run on a CUDA GPU: its plugin is installed and JAX_PLATFORMS, if set,
    names cuda (or gpu) first."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms and platforms.split(",")[0].strip() not in ("cuda", "gpu"):
        return False
    return cuda_plugin_installed()


def configure() -> tuple[str, ...]:
    """Sets XLA_FLAGS to `GPU_FLAGS` when JAX will run on a GPU and XLA_FLAGS is unset; must run
    before JAX starts its backend. Returns the flags it set (empty when it set none)."""
    if "XLA_FLAGS" in os.environ or not GPU_FLAGS or not runs_on_gpu():
        return ()
    os.environ["XLA_FLAGS"] = " ".join(GPU_FLAGS)
    return GPU_FLAGS
