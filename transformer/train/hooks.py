"""What the training loop does besides stepping: hooks that run every N steps or at the end.

The loop (`Trainer.run`) calls each due hook with a `StepInfo`. The hooks of a run, in order:

  MetricSums.add        every step: adds the step's metric sums on the device (no host sync)
  LogMetrics            every train.log_every_steps, train.eval_every_steps and at the last
                        step: one record (training loss, lr, throughput, MFU, held-out loss,
                        BLEU) to metrics.jsonl, TensorBoard and the progress bar; applies the
                        non-finite policy; agrees a stop request across processes
  SaveCheckpoint        every checkpoint.every_steps, at the end and on a stop request
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from transformer.errors import NonFiniteError
from transformer.model import sharding


@dataclasses.dataclass
class StepInfo:
    step: int  # optimizer steps taken, after this one
    state: Any  # the TrainState after the step
    metrics: dict[str, jax.Array]  # the step's sums, on the device
    num_steps: int  # train.num_steps
    stop_at: int  # where this invocation ends: train.stop_at_step, else num_steps
    stop: Any  # the StopSignal: a signal or preemption notice ends the run early

    @property
    def last(self) -> bool:
        """The run's last step."""
        return self.step == self.num_steps

    @property
    def stopping(self) -> bool:
        """This invocation ends after this step (read late: a record may agree a stop)."""
        return self.step == self.stop_at or self.stop.requested


@dataclasses.dataclass
class Hook:
    """`fn(info)` every `every` steps (0 = never periodically), at the last step when
    `at_last`, and whenever this invocation stops when `at_stop`."""

    fn: Callable[[StepInfo], Any]
    every: int = 0
    at_last: bool = False
    at_stop: bool = False
    also_with: tuple[Hook, ...] = ()  # also due whenever one of these is

    def due(self, info: StepInfo) -> bool:
        periodic = self.every > 0 and info.step % self.every == 0
        return (
            periodic
            or (self.at_last and info.last)
            or (self.at_stop and info.stopping)
            or any(h.due(info) for h in self.also_with)
        )


# ---------------------------------------------------------------------------------------------
# Metric sums since the last record: on the device between records, in checkpoints between
# runs (a run resumed between two records logs what an uninterrupted run logs).

_SUM_DTYPES = {
    "loss_sum": np.float32,
    "nll_sum": np.float32,
    "tokens": np.float32,
    "grad_norm": np.float32,
    "nonfinite": np.int32,  # steps with a non-finite loss or gradient norm
    "steps": np.int32,
    "first_nonfinite": np.int32,  # the first such step, 0 = none
}


@jax.jit
def _add(sums: dict[str, jax.Array], metrics: dict[str, jax.Array], step: jax.Array) -> Any:
    # A non-finite step (skipped, or about to stop the run) is counted, not summed.
    finite = metrics["nonfinite"] == 0
    out = {k: sums[k] + jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
    out["nonfinite"] = sums["nonfinite"] + metrics["nonfinite"]
    out["steps"] = sums["steps"] + 1
    first = (metrics["nonfinite"] > 0) & (sums["first_nonfinite"] == 0)
    out["first_nonfinite"] = jnp.where(first, step, sums["first_nonfinite"])
    return out


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class MetricSums:
    """The step metrics summed since the last record, replicated over the mesh."""

    def __init__(self, mesh: jax.sharding.Mesh, saved: dict[str, Any] | None = None):
        self.mesh = mesh
        self.reset(saved)

    def reset(self, saved: dict[str, Any] | None = None) -> None:
        replicated = sharding.replicated(self.mesh)
        values = {k: np.asarray((saved or {}).get(k, 0), d) for k, d in _SUM_DTYPES.items()}
        self.sums = {
            k: jax.make_array_from_callback((), replicated, lambda _, v=v: v)
            for k, v in values.items()
        }

    def add(self, info: StepInfo) -> None:
        self.sums = _add(self.sums, info.metrics, info.step)

    def fetch(self) -> dict[str, np.ndarray]:
        """The sums as host NumPy scalars (a host sync)."""
        return jax.device_get(self.sums)


def plain(sums: dict[str, Any]) -> dict[str, Any]:
    """Python numbers, for JSON."""
    return {k: np.asarray(v).item() for k, v in sums.items()}


class NonFinitePolicy:
    """train.nonfinite: 'stop' raises at the record after a non-finite step; 'skip' lets the
    step function skip such updates. Either way non-finite parameters are never saved."""

    def __init__(self, policy: str, newest_checkpoint: Callable[[], int | None]):
        self.policy = policy
        self.newest_checkpoint = newest_checkpoint

    def check(self, sums: dict[str, Any], params: Any = None) -> None:
        bad_step = int(sums["first_nonfinite"]) if self.policy == "stop" else 0
        if not bad_step and (params is None or bool(_all_finite(params))):
            return
        newest = self.newest_checkpoint()
        kept = f"the checkpoint at step {newest} is kept" if newest else "no checkpoint was saved"
        what = (
            f"non-finite loss or gradients at step {bad_step}"
            if bad_step
            else "non-finite parameters"
        )
        raise NonFiniteError(
            f"{what} ({kept}); lower train.learning_rate or raise train.warmup_steps, or set "
            "train.nonfinite=skip to skip non-finite updates"
        )


class Throughput:
    """Wall time spent training since the last record: excludes evaluation and saving."""

    def __init__(self, step: int) -> None:
        self.restart(step)

    def restart(self, step: int) -> None:
        self.time, self.step, self.excluded = time.perf_counter(), step, 0.0

    def exclude_since(self, start: float) -> None:
        """Time since `start` (or since the restart, if later) was not training."""
        self.excluded += time.perf_counter() - max(start, self.time)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.time - self.excluded, 1e-9)


class LogMetrics:
    """One record per log step: the training metrics since the last record, and the
    `measures` due at this step (each a Hook whose fn returns metrics: held-out loss, BLEU).
    Run it as `Hook(log, every=log_every, at_last=True, also_with=measures)`."""

    SHOWN = ("train_loss", "val_loss", "tokens_per_sec", "mfu")

    def __init__(
        self,
        sums: MetricSums,
        policy: NonFinitePolicy,
        writer: Any,
        clock: Throughput,
        schedule: Callable[[int], Any],
        mfu_per_token_per_sec: float | None,
        measures: tuple[Hook, ...] = (),
        bar: Any = None,
        on_record: Callable[[], Any] = lambda: None,
    ):
        self.sums, self.policy, self.writer, self.clock = sums, policy, writer, clock
        self.schedule, self.mfu_per_token_per_sec = schedule, mfu_per_token_per_sec
        self.measures, self.bar, self.on_record = measures, bar, on_record
        self.last: dict[str, Any] = {}  # the newest record, with its step

    def __call__(self, info: StepInfo) -> None:
        summed = self.sums.fetch()  # the one host sync between records
        self.policy.check(summed)
        record = self.summarise(summed, info.step)
        self.sums.reset()
        for hook in self.measures:
            if hook.due(info):
                record.update(hook.fn(info))
        self.writer.write(info.step, record)
        self.last = {"step": info.step, **record}
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in self.SHOWN})
        self.on_record()
        self.clock.restart(info.step)

    def summarise(self, summed: dict[str, Any], step: int) -> dict[str, Any]:
        tokens_per_sec = float(summed["tokens"]) / self.clock.elapsed()
        finite_steps = int(summed["steps"]) - int(summed["nonfinite"])
        record: dict[str, Any] = {
            # NaN when every step since the last record was skipped as non-finite
            "train_loss": float(summed["nll_sum"] / summed["tokens"]) if finite_steps else math.nan,
            "learning_rate": float(self.schedule(step - 1)),
            "tokens_per_sec": tokens_per_sec,
        }
        if self.mfu_per_token_per_sec is not None:
            record["mfu"] = tokens_per_sec * self.mfu_per_token_per_sec
        record["grad_norm"] = (
            float(summed["grad_norm"]) / finite_steps if finite_steps else math.nan
        )
        if summed["nonfinite"]:  # train.nonfinite=skip: those updates were not applied
            record["nonfinite_steps"] = int(summed["nonfinite"])
        return record


class SaveCheckpoint:
    """Saves the train state, the data position, the run config and the pending metric sums.
    Never a non-finite state: steps since the last record may have gone non-finite."""

    def __init__(
        self,
        checkpoints: Any,
        sums: MetricSums,
        policy: NonFinitePolicy,
        data_iter: Any,
        config: dict[str, Any],
    ):
        self.checkpoints, self.sums, self.policy = checkpoints, sums, policy
        self.data_iter, self.config = data_iter, config

    def __call__(self, info: StepInfo) -> None:
        summed = self.sums.fetch()
        self.policy.check(summed, info.state.params)
        self.checkpoints.save(info.step, info.state, self.data_iter, self.config, plain(summed))
