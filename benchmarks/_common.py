"""Shared by the benchmark scripts: machine description, GPT configs without data, tables, JSON."""

from __future__ import annotations

import importlib.util
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

    from transformer.convert import hf_config_from

    hf_logging.set_verbosity_error()
    torch.set_num_threads(num_cores())
    torch.manual_seed(0)
    hf_config = hf_config_from(model_cfg, vocab_size=vocab)
    hf_config.pad_token_id = 0  # generate() wants one; the prompts are not padded
    return GPT2LMHeadModel(hf_config)


def load_run_config(path: str) -> Any:
    """`get_config()` of a configs/NAME.py file."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load --config {path}; pass a configs/NAME.py file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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


def write_json(path: Path | None, results: dict[str, Any]) -> None:
    if path is None:
        return

    def plain(value: Any) -> Any:
        if isinstance(value, (np.generic,)):
            return value.item()
        raise TypeError(f"not JSON serialisable: {type(value)}")

    path.write_text(json.dumps(results, indent=2, default=plain) + "\n")
    print(f"wrote {path}")
