"""Shared command-line plumbing: one clear line and exit code 2 for user errors."""

from __future__ import annotations

import errno
import inspect
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable

USAGE_EXIT_CODE = 2  # the input is wrong: config, files, devices, disk space
FAILURE_EXIT_CODE = 1  # the run failed (it diverged); the message names the fix


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input is wrong", not "the program is wrong"."""
    from transformer.checkpoint import CheckpointError
    from transformer.config import ConfigError

    types: list[type[BaseException]] = [ConfigError, CheckpointError, FileNotFoundError]
    try:
        from transformer.data import DataError

        types.append(DataError)
    except ImportError:
        pass
    try:
        from transformer.convert import ConvertError

        types.append(ConvertError)
    except ImportError:
        pass
    return tuple(types)


def run(main: Callable[[], int | None], *, program: str, debug: bool = False) -> int:
    """Runs `main`, turning user errors into `program: error: ...` and exit code 2 (a
    diverged run: exit code 1), without a traceback unless `debug`."""
    from transformer.reliability import NonFiniteError

    try:
        return int(main() or 0)
    except user_error_types() as e:
        if debug:
            traceback.print_exc()
        print(f"{program}: error: {e}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except NonFiniteError as e:  # the run diverged: the message names the step and the fix
        if debug:
            traceback.print_exc()
        print(f"{program}: error: {e}", file=sys.stderr)
        return FAILURE_EXIT_CODE
    except OSError as e:
        if debug or e.errno != errno.ENOSPC:  # disk full is the user's to fix
            raise
        from transformer.checkpoint import CheckpointDiskFullError

        message = (
            e.strerror
            if isinstance(e, CheckpointDiskFullError)
            else f"disk full ({e}); free space or choose another --workdir, then run the same "
            "command to resume from the last complete checkpoint"
        )
        print(f"{program}: error: {message}", file=sys.stderr)
        return USAGE_EXIT_CODE


def setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # Orbax and absl are chatty at INFO; keep the console for our own messages.
    for name in ("absl", "orbax", "jax._src", "grain"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.ERROR)
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # Orbax logs the tracebacks of its writer threads (absl, ERROR) before the same error
        # reaches the main thread, where it becomes our one-line message; --debug shows them.
        # The same for its asyncio readers and writers: after one fails (a damaged checkpoint,
        # a full disk) the others' errors surface as unretrieved tasks, coroutines collected
        # with an exception and callbacks into a closed event loop.
        for name in ("absl", "asyncio"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        sys.unraisablehook = _quiet_unraisable
        # Writes a failed save never started are reported once more at interpreter exit, as
        # "coroutine ... was never awaited" (a RuntimeWarning, after our one-line error).
        warnings.filterwarnings(
            "ignore", message="coroutine .* was never awaited", category=RuntimeWarning
        )


def _quiet_unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """Drops the asyncio leftovers of a failed Orbax read or write (see setup_logging);
    anything else goes to the default hook."""
    exc = unraisable.exc_value
    if (
        sys.is_finalizing()
        or inspect.iscoroutine(unraisable.object)
        or (isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc))
    ):
        return
    sys.__unraisablehook__(unraisable)


def parse_flags_or_exit(argv: list[str], program: str) -> None:
    """absl flag parsing with one line and exit code 2 on bad flags (absl prints usage)."""
    from absl import flags

    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        print(f"{program}: error: {e}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
    except Exception as e:  # e.g. a config file that fails to load or a wrong-typed override
        if "--debug" in argv:
            raise
        message = str(e)
        if isinstance(e, (KeyError, AttributeError)):  # ml_collections: an unknown field
            name = str(e.args[0]).strip("'\"") if e.args else ""
            culprit = [a for a in argv if a.startswith("--config.") and f".{name}" in a]
            shown = culprit[0].split("=")[0][2:] if culprit else name
            message = (
                f"unknown config field {shown!r}; check its spelling against the fields "
                "in transformer/config.py base_config()"
            )
        print(f"{program}: error: {message}", file=sys.stderr)
        sys.exit(USAGE_EXIT_CODE)
