"""Orbax checkpoints of a run: train state, data-iterator position and the resolved config.

Each step is one directory `checkpoints/<step>/` with the items `state` (params, optimizer
state, step, RNG), `data` (the grain iterator's position, one file per process), `config`
(JSON) and `metrics` (JSON: the metric sums since the last log, so a run resumed between two log
steps logs the numbers an uninterrupted run logs). `restore` reads into an abstract, sharded
target: a checkpoint saved on one mesh restores onto another.

What protects a checkpoint (checked on orbax-checkpoint 0.12.8, see tests/test_faults.py):
- A save writes into `<step>.orbax-checkpoint-tmp/` and renames it to `<step>/` only when every
  item is complete (on object stores, which cannot rename, a `commit_success.txt` marks it).
  Orbax lists only names that are all digits, so a process killed mid-save leaves the previous
  checkpoint as the newest; the temporary directory is removed when the next run opens the
  manager (`cleanup_tmp_directories`).
- A step whose files were later truncated or deleted fails to read: `restore_latest_good`
  warns and falls back to the previous step, then moves the damaged one aside to
  `<step>.damaged/` (so training can save that step again).
- A disk that fills during a save raises `CheckpointDiskFullError` (an `OSError` with errno
  ENOSPC) naming the step and the newest complete checkpoint; the half-written temporary
  directory is removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from transformer.errors import CheckpointDiskFullError, CheckpointError

log = logging.getLogger(__name__)
T = TypeVar("T")

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a save in progress
DAMAGED_SUFFIX = ".damaged"


def _is_disk_full(e: BaseException) -> bool:
    """Orbax reports ENOSPC from tensorstore as ValueError('RESOURCE_EXHAUSTED: ... No space
    left on device [os_error_code=28]'), not as an OSError."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        text = str(e)
        if "No space left on device" in text or "os_error_code='28'" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


@contextlib.contextmanager
def _absl_level(level: int | None) -> Iterator[None]:
    logger = logging.getLogger("absl")
    previous = logger.level
    if level is not None:
        logger.setLevel(max(level, previous))
    try:
        yield
    finally:
        logger.setLevel(previous)


def short_error(e: BaseException, limit: int = 300) -> str:
    """The root cause's first line, shortened: tensorstore messages run to kilobytes."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Checkpoints:
    def __init__(
        self, directory: str, *, keep: int = 3, async_save: bool = False, read_only: bool = False
    ):
        self.directory = os.path.abspath(directory)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep > 0 and not read_only else None,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,  # drop half-written saves of a killed run
            **({"save_interval_steps": 0} if read_only else {}),
        )
        # Orbax tells a read-only manager, through absl's logger, that it is read-only: noise
        # for a user loading a run.
        with _absl_level(logging.ERROR if read_only else None):
            self.manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "data", "config", "metrics")
            )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self,
        step: int,
        state: Any,
        data_iter: Any = None,
        config: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        if metrics is not None:
            items["metrics"] = ocp.args.JsonSave(metrics)
        newest = self.latest_step()
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            if not _is_disk_full(e):
                raise
            # Free what the failed save wrote; the next start would remove it anyway.
            shutil.rmtree(os.path.join(self.directory, f"{step}{TMP_SUFFIX}"), ignore_errors=True)
            kept = f"the checkpoint at step {newest} is intact" if newest else "no checkpoint yet"
            raise CheckpointDiskFullError(
                errno.ENOSPC,
                f"disk full while saving the checkpoint at step {step} in {self.directory} "
                f"({kept}); free space or choose another --workdir, then run the same command "
                "to resume",
            ) from e

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """Restores `state` into the abstract target's shapes, dtypes and shardings, and moves
        `data_iter` to the saved position (in place)."""
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def restore_latest_good(
        self,
        abstract_state: Any,
        data_iter: Any = None,
    ) -> tuple[int, Any] | None:
        """The newest checkpoint that reads back whole. A damaged one is reported and the
        previous step tried; once one reads, the damaged ones are moved aside to
        `<step>.damaged/` (unless read-only). None when there is no checkpoint at all."""
        if not self.all_steps():
            return None
        step, state, damaged = self.newest_readable(
            lambda step: self.restore(step, abstract_state, data_iter)
        )
        if damaged:
            log.warning(
                "resuming from step %d instead of the damaged step(s) %s",
                step,
                ", ".join(map(str, damaged)),
            )
        self._move_aside(damaged)
        return step, state

    def newest_readable(
        self, read: Callable[[int], T], steps: list[int] | None = None
    ) -> tuple[int, T, list[int]]:
        """(step, read(step), damaged steps) for the newest of `steps` (default: all) that
        `read` reads without an error; each failure is logged as a damaged step. Raises
        CheckpointError when none reads (damaged steps are left in place: nothing is lost by
        trying again, or by looking at them)."""
        damaged, newest_error = [], ""
        for step in sorted(self.all_steps() if steps is None else steps, reverse=True):
            try:
                return step, read(step), damaged
            except Exception as e:  # noqa: BLE001 - any read failure means "damaged"
                damaged.append(step)
                newest_error = newest_error or f"step {step}: {short_error(e)}"
                log.warning(
                    "the checkpoint at step %d is damaged or incomplete (%s); falling back to "
                    "the previous checkpoint",
                    step,
                    short_error(e),
                )
        raise CheckpointError(
            f"no checkpoint in {self.directory} could be read (damaged steps: "
            f"{', '.join(map(str, damaged))}); {newest_error}; move the directory away to start "
            "afresh"
        )

    def restore_params(self, step: int, target: Any) -> Any:
        """Only the parameters, as host NumPy arrays shaped like `target` (a tree of arrays)."""
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        item = ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True
        )
        return self.manager.restore(step, args=ocp.args.Composite(state=item))["state"]["params"]

    def _move_aside(self, steps: list[int]) -> None:
        """Renames damaged steps out of Orbax's sight, so training can save those steps again
        (Orbax refuses to overwrite a step) while the files stay for a post-mortem."""
        if self.read_only:
            return
        if steps and jax.process_index() == 0:
            for step in steps:
                source = os.path.join(self.directory, str(step))
                target = source + DAMAGED_SUFFIX
                shutil.rmtree(target, ignore_errors=True)
                if os.path.isdir(source):
                    os.replace(source, target)
                    log.warning("moved the damaged checkpoint to %s", target)
        if jax.process_count() > 1:  # every process reloads after process 0 renamed
            multihost_utils.sync_global_devices("transformer.checkpoint.move_aside")
        self.manager.reload()

    def read_metrics(self, step: int) -> dict[str, Any] | None:
        """The metric sums pending at `step` (None for a checkpoint saved without them)."""
        return self._read_json(step, "metrics")

    def _read_json(self, step: int, item: str) -> dict[str, Any] | None:
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
            )
        except Exception:  # noqa: BLE001 - an old or damaged checkpoint without the item
            return None
        return restored[item]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
