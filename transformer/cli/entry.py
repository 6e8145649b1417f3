"""How every command starts and ends: `main_entry` parses the flags (or prints `--help`),
runs the command and turns the errors a user can cause (`transformer.errors`) into one line with
exit code 2 (1 for a run that diverged), without a traceback unless `--debug`."""

from __future__ import annotations

import errno
import inspect
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from typing import NoReturn

from absl import flags

from transformer.cli.flags import (
    HELP_FLAGS,
    USAGE_EXIT_CODE,
    help_text,
    options,
    parse_flags_or_exit,
)
from transformer.errors import USER_ERRORS, CheckpointDiskFullError, NonFiniteError

FAILURE_EXIT_CODE = 1  # the run failed (it diverged); the message names the fix


def main_entry(main: Callable[[], int | None], program: str) -> NoReturn:
    """The command line of `program`, whose flags are defined in `main`'s module: `--help` (or
    -h, --helpshort, --helpfull) prints the usage, the module's docstring, its flags and, with a
    `--config` flag, every config field; otherwise parses the flags and runs `main` (see `run`).
    Exits 0, 1 (the run failed) or 2 (the input is wrong)."""
    argv = list(sys.argv)
    given = options(argv)
    wanted = [a for a in given if a in HELP_FLAGS]
    if wanted:
        rest = argv[1 + len(given) :]
        argv = [argv[0], *(a for a in given if a not in HELP_FLAGS), *rest]
    parse_flags_or_exit(argv, program, for_help=bool(wanted))
    if wanted:
        module = sys.modules[main.__module__]
        text = help_text(module, program, full=any("helpfull" in a for a in wanted))
        try:
            print(text, flush=True)
        except BrokenPipeError:  # e.g. `--help | head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    debug = bool(getattr(flags.FLAGS, "debug", False))
    setup_logging(debug)
    sys.exit(run(main, program=program, debug=debug))


def run(main: Callable[[], int | None], *, program: str, debug: bool = False) -> int:
    """Runs `main`, turning user errors into `program: error: ...` and exit code 2 (a
    diverged run: exit code 1), without a traceback unless `debug`."""
    try:
        return int(main() or 0)
    except USER_ERRORS as e:
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
