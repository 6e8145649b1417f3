"""Stopping cleanly: SIGTERM/SIGINT (preemption, Ctrl-C) end a run at a step boundary with a
checkpoint, instead of killing it mid-step."""

from __future__ import annotations

import signal
import types
from typing import Any

import jax


class StopSignal:
    """Context manager: while active, SIGTERM and SIGINT set `requested` instead of killing.

    On several processes the flag is agreed at `sync` points (any process asked -> all stop),
    so every process saves the same step together. A second signal of the same kind restores
    the default behaviour, so pressing Ctrl-C twice still exits at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._local = False
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self._local = True
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        if jax.process_count() == 1:
            self.requested = True

    def sync(self) -> bool:
        """Agrees the flag across processes (a collective: call it at the same step on all)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(jax.numpy.array(int(self._local)))
            self.requested = bool(flags.max())
            if self.requested and not self.signal_name:
                self.signal_name = "a signal on another process"
        return self.requested

    def __enter__(self) -> StopSignal:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): leave signals alone
            self._previous.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
