"""Metrics: `metrics.jsonl` + TensorBoard event files in the workdir, FLOP counts and MFU."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tensorboardX import SummaryWriter

from transformer.model.config import ModelConfig
from transformer.store.rundir import RunDir

# Published dense bfloat16 peaks (FLOP/s per device), matched against `device_kind`.
KNOWN_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}


class MetricsWriter:
    """Appends one JSON object per logged step (floats at full precision) and mirrors scalars
    to TensorBoard. Only the main process writes; others are no-ops."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = RunDir(workdir).metrics_path
        self._tb = None
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._tb = SummaryWriter(logdir=workdir, flush_secs=30)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")  # json writes floats with repr: full precision
        for key, value in record.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    if isinstance(value, (np.ndarray, jax.Array)):
        value = np.asarray(value).item()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    return RunDir(workdir).read_metrics()


def count_params(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def non_embedding_params(cfg: ModelConfig, num_params: int) -> int:
    """Parameters that cost 6 FLOPs per token: all but the position table (a lookup). The token
    table stays in: it is also the output projection, a real matrix product."""
    positions = cfg.max_len * cfg.d_model if cfg.positions == "learned" else 0
    return num_params - positions


def flops_per_token(
    cfg: ModelConfig, num_params: int, seq_len: int, src_len: int | None = None
) -> float:
    """Training FLOPs per (target) token: 6N + 12 L H Q T (PaLM appendix B, nanoGPT).

    For the encoder-decoder the attention term counts encoder self-attention over the source,
    decoder self-attention over the target and cross-attention target x source, per target
    token; 6N counts every parameter once per target token (a source token per target token).
    """
    n = non_embedding_params(cfg, num_params)
    heads, head_dim = cfg.num_heads, cfg.head_dim
    attention = 12 * cfg.num_decoder_layers * heads * head_dim * seq_len
    if not cfg.is_decoder_only:
        src = seq_len if src_len is None else src_len
        attention += 12 * cfg.num_encoder_layers * heads * head_dim * src
        attention += 12 * cfg.num_decoder_layers * heads * head_dim * src
    return 6.0 * n + attention


def measure_matmul_flops(size: int = 2048, repeats: int = 10, dtype: Any = jnp.float32) -> float:
    """Measured FLOP/s of a large matrix product under XLA on one local device: the best of
    `repeats` timed products after a warm-up, since a limit is what the machine reaches when
    nothing else is in the way (a median would fall with every other process's load)."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / min(times)


def known_peak_flops(device: Any) -> float | None:
    """The published dense bfloat16 peak of a known accelerator (per device), else None."""
    kind = getattr(device, "device_kind", "")
    for name, peak in KNOWN_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None
