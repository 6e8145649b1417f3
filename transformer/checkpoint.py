"""Orbax checkpoints of a run: train state, data-iterator position and the resolved config.

Each step is one directory `checkpoints/<step>/` with the items `state` (params, optimizer
state, step, RNG), `data` (the grain iterator's position, one file per process) and `config`
(JSON). Orbax writes into a temporary directory and renames it when complete, so a process
killed mid-save leaves the previous checkpoint as the newest complete one. `restore` reads into
an abstract, sharded target: a checkpoint saved on one mesh restores onto another.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint could be read."""


def _grain_args() -> tuple[Any, Any]:
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class Checkpoints:
    def __init__(
        self, directory: str, *, keep: int = 3, async_save: bool = False, read_only: bool = False
    ):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 else None,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # drop half-written saves of a killed run
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, data_iter: Any = None, config: dict[str, Any] | None = None
    ) -> None:
        save, _ = _grain_args()
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = save(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """Restores `state` into the abstract target's shapes, dtypes and shardings, and moves
        `data_iter` to the saved position (in place)."""
        _, restore = _grain_args()
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = restore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_latest_good(
        self,
        abstract_state: Any,
        data_iter: Any = None,
    ) -> tuple[int, Any] | None:
        """The newest checkpoint that reads back whole; damaged ones are reported and skipped."""
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
                log.warning(
                    "checkpoint at step %d is damaged or incomplete (%s: %s); "
                    "falling back to the previous one",
                    step,
                    type(e).__name__,
                    e,
                )
        if self.all_steps():
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be read; move the directory away to "
                "start afresh"
            )
        return None

    def read_config(self, step: int) -> dict[str, Any] | None:
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
            )
        except Exception:  # noqa: BLE001 - an old or damaged checkpoint without a config item
            return None
        return restored["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
