"""Every error a user can cause, in one place, and the check that raises the config ones.

Each message names the problem and the fix; the commands (`transformer.cli`) print it as one
line with exit code 2 (1 for a run that diverged), without a traceback unless `--debug`.
"""

from __future__ import annotations

import importlib
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class DataError(ValueError):
    """A problem with the user's data or data config; the message names the problem and the fix."""


class CorpusUnavailableError(DataError):
    """A corpus that must be fetched from the package index could not be fetched."""


class ConvertError(ValueError):
    """A checkpoint or config cannot be converted; the message names the problem and the fix."""


class MissingDependencyError(ConvertError, ImportError):
    """An optional package (an extra of the project) is not installed."""


class CheckpointError(RuntimeError):
    """No usable checkpoint could be read."""


class CheckpointDiskFullError(OSError):
    """The disk filled up while a checkpoint was written (errno ENOSPC)."""


class NonFiniteError(FloatingPointError):
    """The loss, gradients or parameters became NaN or inf (train.nonfinite='stop')."""


# What the commands report as "the input is wrong" (exit code 2).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    ConvertError,
    CheckpointError,
    FileNotFoundError,
)


def check_fields(section: str, cfg: Any, rules: list[tuple[str, bool, str]]) -> None:
    """Raises a ConfigError for the first rule `(field, ok, fix)` that fails:
    'section.field=value: fix'."""
    for field, ok, fix in rules:
        if not ok:
            raise ConfigError(f"{section}.{field}={getattr(cfg, field)!r}: {fix}")


def one_of(value: Any, allowed: tuple[str, ...]) -> tuple[bool, str]:
    """`(ok, fix)` for a field that takes one of `allowed`."""
    return value in allowed, f"must be one of {', '.join(allowed)}"


def require(module: str, extra: str = "hf", purpose: str = "Hugging Face conversion") -> Any:
    """Imports an optional package of the project's `extra`, or raises MissingDependencyError
    naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{purpose} needs the '{module.split('.')[0]}' package; "
            f'install the {extra} extra: pip install -e ".[{extra}]"'
        ) from e
