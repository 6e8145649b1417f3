"""Surviving faults: signals and preemption end a run at a step boundary, with a checkpoint.

- `StopSignal`: SIGTERM/SIGINT (preemption, Ctrl-C) end a run at a step boundary with a
  checkpoint, instead of killing it mid-step. On several processes JAX's preemption sync point
  (`reached_preemption_sync_point`) is polled every step where the distributed client runs the
  preemption service; it then owns SIGTERM and picks the step every process saves.
- a NaN or inf loss or gradient with `train.nonfinite='stop'` raises
  `transformer.errors.NonFiniteError` (`transformer.train.hooks.NonFinitePolicy`).
"""

from __future__ import annotations

import logging
import signal
import types
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def _preemption_service() -> bool:
    """Whether this multi-process run has JAX's preemption sync manager (it owns SIGTERM)."""
    if jax.process_count() == 1:
        return False
    try:
        from jax._src import distributed  # private and version-bound: no public accessor

        return distributed.global_state.preemption_sync_manager is not None
    except Exception:  # noqa: BLE001 - a JAX without it: fall back to our own handler
        return False


class StopSignal:
    """Context manager: while active, SIGTERM and SIGINT set `requested` instead of killing.

    On several processes the flag is agreed at `sync` points (any process asked -> all stop),
    so every process saves the same step together. Where JAX's preemption service runs (the
    default for `jax.distributed.initialize`), its notifier keeps SIGTERM and `check_preemption`
    (called every step) reports the step all processes agreed on. A second signal of the same
    kind restores the default behaviour, so pressing Ctrl-C twice still exits at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._local = False
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}
        self._preemption = False  # poll reached_preemption_sync_point

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self._local = True
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        if jax.process_count() == 1:
            self.requested = True

    def sync(self) -> bool:
        """Agrees the flag across processes (a collective: call it at the same step on all)."""
        if jax.process_count() > 1:
            flags = multihost_utils.process_allgather(np.array([int(self._local)], np.int32))
            self.requested = self.requested or bool(flags.max())
            if self.requested and not self.signal_name:
                self.signal_name = "a signal on another process"
        return self.requested

    def check_preemption(self, step: int) -> bool:
        """JAX's preemption sync point; call it after every step on every process (cheap: it
        reads a flag the coordination service sets). A no-op on one process."""
        if not self._preemption:
            return self.requested
        try:
            if multihost_utils.reached_preemption_sync_point(step):
                self.requested = True
                self.signal_name = self.signal_name or "a preemption notice (SIGTERM)"
        except Exception as e:  # noqa: BLE001 - no service after all: use our own handler
            log.info("JAX's preemption sync point is unavailable (%s); handling SIGTERM here", e)
            self._preemption = False
            self._install((signal.SIGTERM,))
        return self.requested

    def _install(self, signals: tuple[int, ...]) -> None:
        try:
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): leave signals alone
            self._previous.clear()

    def __enter__(self) -> StopSignal:
        self._preemption = _preemption_service()
        if self._preemption:
            log.info("multi-process run: JAX's preemption service handles SIGTERM")
        owned = (signal.SIGTERM,) if self._preemption else ()
        self._install(tuple(s for s in self.SIGNALS if s not in owned))
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
