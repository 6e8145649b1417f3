"""Shared by the benchmark scripts: machine description, GPT configs without data, tables, JSON."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def num_cores() -> int:
    """Cores this process may run on (what both JAX and torch get)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine() -> dict[str, Any]:
    import jax

    device = jax.local_devices()[0]
    return {
        "platform": device.platform,
        "device_kind": getattr(device, "device_kind", ""),
        "device_count": jax.device_count(),
        "cores": num_cores(),
        "cpu": platform.processor() or platform.machine(),
        "load_average": load_average(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def format_load(load: Sequence[float] | None) -> str:
    return ", ".join(f"{x:.2f}" for x in load) if load else "n/a"


def reference_gpt2(model_cfg: Any, vocab: int) -> Any:
    """`transformers` GPT2LMHeadModel of the same shape as `model_cfg` (the GPT-2 config that
    export would write, `vocab` real tokens), float32 on torch CPU with as many threads as this
    process has cores, seeded."""
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from transformer.hf import config_to_hf

    hf_logging.set_verbosity_error()
    torch.set_num_threads(num_cores())
    torch.manual_seed(0)
    hf_config = config_to_hf(model_cfg, vocab_size=vocab, family="gpt2")
    hf_config.pad_token_id = 0  # generate() wants one; the prompts are not padded
    return GPT2LMHeadModel(hf_config)


def load_run_config(path: str) -> Any:
    """`get_config()` of a configs/NAME.py file; a bad path exits with one line."""
    from transformer.errors import ConfigError
    from transformer.train.config import load_config_file

    try:
        return load_config_file(path)
    except ConfigError as error:
        raise SystemExit(f"--config: {error}") from None


def add_set_argument(parser: Any, example: str, scope: str = "any config field") -> None:
    """The `--set KEY=VALUE` option (repeatable) that `apply_overrides` applies."""
    help = f"override {scope}, e.g. --set {example} (repeatable)"
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=help)


def apply_overrides(config: Any, overrides: Sequence[str]) -> None:
    """KEY=VALUE pairs (`model.dtype=bfloat16`), each cast to the type of the field it sets."""
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE, e.g. model.dtype=bfloat16")
        key, raw = item.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise SystemExit(f"--set {key}: no such config field")
        current = node[leaf]
        if isinstance(current, bool):
            value: Any = raw.lower() in ("1", "true", "yes")
        elif isinstance(current, (int, float)):
            value = type(current)(float(raw)) if isinstance(current, int) else float(raw)
        else:
            value = raw
        node[leaf] = value


def peak_host_memory_bytes() -> int:
    """This process's resident-set high-water mark (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024


def limit_jax_gpu_memory(fraction: float) -> str | None:
    """Let JAX's GPU allocator take `fraction` of each GPU's memory instead of its default 75%
    (taken at start): less, to leave room for torch in the same process; more, to fit the
    largest model. Only takes effect before JAX first touches the GPU, and keeps a fraction the
    caller already set. Returns the variable it set, or None. jaxlib reads
    XLA_CLIENT_MEM_FRACTION, or on older versions XLA_PYTHON_CLIENT_MEM_FRACTION (setting both
    is an error), so the name is taken from the installed jaxlib."""
    names = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
    if any(os.environ.get(name) for name in names):
        return None
    name = names[1]
    try:
        import inspect

        from jax._src.lib import xla_client

        if names[0] in inspect.getsource(xla_client.generate_pjrt_gpu_plugin_options):
            name = names[0]
    except Exception:  # noqa: BLE001 - a private module; the older name still works
        pass
    os.environ[name] = f"{fraction:.2f}"
    return name


def reference_device(choice: str, platform: str) -> tuple[str | None, str]:
    """The torch device for the reference (or None) and, when None, why."""
    if choice == "none":
        return None, "not asked for"
    if choice == "auto":
        if platform == "cpu":
            return "cpu", ""
        if platform != "gpu":
            return None, f"no torch reference on {platform}"
        choice = "cuda"
    if choice == "cuda":
        try:
            import torch
        except ImportError:
            return None, "torch is not installed"
        if not torch.cuda.is_available():
            return None, f"torch {torch.__version__} sees no CUDA device"
    return choice, ""


def make_room_for_torch(reference_device: str) -> None:
    """Before JAX touches a GPU: when a torch reference may share it, let JAX take 45% of it."""
    import importlib.util

    if reference_device in ("auto", "cuda") and importlib.util.find_spec("torch"):
        limit_jax_gpu_memory(0.45)


def is_out_of_memory(error: BaseException | str) -> bool:
    """Whether an exception (or the last lines of a process's output) is XLA or torch running
    out of memory; only the end counts, since XLA's allocator also logs harmless retries."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = "\n".join(lines[-5:]) if isinstance(error, str) else str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def short_error(error: BaseException) -> str:
    """An exception as one line for a report: the root cause's type and first line."""
    from transformer.store.checkpoint import short_error

    return short_error(error, limit=400)


def device_memory_limit_bytes() -> int | None:
    """What JAX's allocator may hold on the first local device (None on CPU)."""
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def device_peak_memory_bytes() -> int | None:
    import jax

    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def time_calls(fn: Callable[[], Any], steps: int) -> list[float]:
    """Wall time of `steps` calls; `fn` must block until its work is done."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def print_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=False))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def format_count(n: float) -> str:
    """A parameter count for a table: 1.56B, 124M, 0.20M."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:,.0f}M" if n >= 1e7 else f"{n / 1e6:.2f}M"


def format_bytes(n: float) -> str:
    """A memory size for a table: 12.3 GiB, 456 MiB."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.0f} MiB"


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    if path is None:
        return

    def plain(value: Any) -> Any:
        if isinstance(value, (np.generic,)):
            return value.item()
        raise TypeError(f"not JSON serialisable: {type(value)}")

    path.write_text(json.dumps(results, indent=2, default=plain) + "\n")
    print(f"wrote {path}")
