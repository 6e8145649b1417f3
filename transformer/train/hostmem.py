"""Host memory for XLA on CPU: keep freed memory for reuse instead of returning it to the OS.

XLA on CPU allocates each step's temporary buffer (hundreds of MB for a training step) with
`malloc`. glibc serves allocations that large with a fresh `mmap` and unmaps them on `free`,
so every step page-faults the whole buffer in again: about a fifth of the step time of
`benchmarks/train_throughput.py`'s default model. One malloc arena, no `mmap` and no trimming
keep the buffer mapped from one step to the next. The costs: the process's resident memory
stays at its high-water mark, and all threads share one malloc arena (measured on 2 cores;
on a many-core CPU compare `benchmarks/train_throughput.py` with `--no-keep-host-memory`).

`train.py` does this on Linux when JAX will run on the CPU (`--keep_host_memory` overrides);
the benchmarks do it the same way. It must happen before JAX (or torch) starts its threads,
i.e. before the first `jax.devices()` or computation.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import pkgutil
import platform

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_host_memory() -> bool:
    """Sets glibc's malloc to one arena, no mmap and no trimming. Returns whether it applied
    (False off Linux or without glibc)."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
        return all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError):
        return False


def accelerator_plugin_installed() -> bool:
    """Whether a JAX GPU or TPU backend is installed, found without starting any backend."""
    try:
        import jax_plugins  # namespace package of the CUDA and ROCm plugins

        if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
            return True
    except ImportError:
        pass
    return importlib.util.find_spec("libtpu") is not None


def runs_on_cpu() -> bool:
    """Whether JAX will run on the CPU: JAX_PLATFORMS names cpu first, or no accelerator backend
    is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not accelerator_plugin_installed()


def configure(keep: bool | None = None) -> bool:
    """Keeps freed host memory when `keep`, or when `keep` is None and JAX will run on the CPU.
    Returns whether it applied."""
    if keep is None:
        keep = runs_on_cpu()
    return keep_freed_host_memory() if keep else False
