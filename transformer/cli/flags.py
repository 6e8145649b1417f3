"""Flags of the commands: parsing with one clear line for a bad flag, config file or
`--config.SECTION.FIELD=VALUE` override (exit code 2), and `--help` with every config field."""

from __future__ import annotations

import dataclasses
import os
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

from absl import flags

from transformer.model.config import ModelConfig
from transformer.train.config import SECTIONS, describe, unknown_field_message

# The config file `--config` names by default: the repository's configs/default.py.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.py"
USAGE_EXIT_CODE = 2  # the input is wrong: config, files, devices, disk space
HELP_FLAGS = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort", "--helpfull", "-helpfull")


def options(argv: list[str]) -> list[str]:
    """The arguments absl reads as flags: those before a `--`."""
    return argv[1 : argv.index("--")] if "--" in argv else argv[1:]


def parse_flags_or_exit(argv: list[str], program: str, *, for_help: bool = False) -> None:
    """absl flag parsing with one line and exit code 2 on bad flags and config overrides.
    `for_help`: a missing required flag is no error (the help lists it)."""
    problem = _missing_config_file(argv)
    if problem:
        _exit_with(program, problem)
    try:
        flags.FLAGS(argv)
    except flags.Error as e:
        required_missing = isinstance(e, flags.IllegalFlagValueError) and flags.FLAGS.is_parsed()
        if not (for_help and required_missing):  # parsed: only a validator failed
            _exit_with(program, _config_override_error(argv) or str(e))
    except Exception as e:  # e.g. a config file that fails to load or a wrong-typed override
        if "--debug" in argv:
            raise
        _exit_with(program, _config_override_error(argv) or str(e))
    problem = _config_file_error()
    if problem:
        _exit_with(program, problem)


def _exit_with(program: str, message: str) -> NoReturn:
    """`program: error: message` on one line (a multi-line message, e.g. ml_collections' with a
    traceback of the config file, keeps its first and last lines), and exit code 2."""
    lines = [line.strip() for line in message.splitlines() if line.strip()] or [""]
    shown = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    print(f"{program}: error: {shown}", file=sys.stderr)
    sys.exit(USAGE_EXIT_CODE)


def _config_flag() -> Any:
    """The `--config` flag of an ml_collections config file, or None."""
    flag = flags.FLAGS["config"] if "config" in flags.FLAGS else None
    return flag if hasattr(type(flag), "config_filename") else None


def _config_overrides(argv: list[str]) -> list[tuple[str, str | None]]:
    """`(SECTION.FIELD, VALUE)` of each `--config.SECTION.FIELD=VALUE` in `argv` (VALUE None
    when it is the next argument or, for a bool, absent)."""
    overrides = []
    for arg in options(argv):
        name, equals, value = arg.lstrip("-").partition("=")
        for prefix in ("config.", "noconfig."):
            if arg.startswith("-") and name.startswith(prefix):
                overrides.append((name[len(prefix) :], value if equals else None))
    return overrides


_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}


def _config_override_error(argv: list[str]) -> str | None:
    """Why a `--config.SECTION.FIELD=VALUE` in `argv` was refused, or None if none was: an
    unknown field (with the closest known one) or a value of the wrong type."""
    if _config_flag() is None:
        return None
    types = {
        f"{section}.{f.name}": str(f.type)
        for section, cls in {"model": ModelConfig, **SECTIONS}.items()
        for f in dataclasses.fields(cls)
    }
    overrides = _config_overrides(argv)
    for path, _ in overrides:
        if path in {"model", *SECTIONS}:
            return (
                f"config section `{path}` cannot be set as a whole; set its fields, e.g. "
                f"--config.{next(p for p in types if p.startswith(path + '.'))}=..."
            )
        if path not in types:
            return unknown_field_message(path)
    for path, value in overrides:
        if value is not None and not _parses_as(types[path], value):
            expected = _TYPE_NAMES.get(types[path], types[path])
            return f"config field `{path}` takes {expected}, not {value!r}"
    return None


def _parses_as(type_name: str, value: str) -> bool:
    """Whether absl would accept `value` for a config field of type `type_name`."""
    try:
        {"int": int, "float": float}.get(type_name, str)(value)
    except ValueError:
        return False
    return type_name != "bool" or value.lower() in ("", "true", "false", "t", "f", "1", "0")


def _missing_config_file(argv: list[str]) -> str | None:
    """'no config file ...' if the `--config=FILE` in `argv` names none (ml_collections would
    report it only at the config's first use, as a traceback)."""
    if _config_flag() is None:
        return None
    given = [a.partition("=")[2] for a in options(argv) if a.lstrip("-").startswith("config=")]
    if given and not os.path.isfile(given[-1].split(":")[0]):
        return f"no config file {given[-1]}; the bundled ones are in configs/"
    return None


def _config_file_error() -> str | None:
    """Why the parsed `--config` file could not be loaded, or None."""
    flag = _config_flag()
    if flag is None:
        return None
    try:
        flag.value.to_dict()
    except OSError as e:  # ml_collections defers the error to the config's first use
        reason = str(e).splitlines()[-1].strip()
        return f"cannot load the config file {_shown_path(flag.config_filename)}: {reason}"
    return None


# ---------------------------------------------------------------------------------------------
# --help


def help_text(module: ModuleType, program: str, *, full: bool = False) -> str:
    """Usage, `module`'s docstring, the flags it defines (`full`: all flags) and, for a command
    with a `--config` flag, every config field with its value and comment."""
    invocation = f"python {program}" if program.endswith(".py") else f"python -m {program}"
    own = [f for f in flags.FLAGS.get_key_flags_for_module(module) if "." not in f.name]
    required = " ".join(f"--{f.name}=..." for f in own if _is_required(f))
    parts = [
        f"usage: {invocation} {required + ' ' if required else ''}[flags]",
        (module.__doc__ or "").strip(),
        "flags:\n" + "\n".join(_describe_flag(f) for f in own),
    ]
    if full:
        others = {
            f.name: f
            for module_flags in flags.FLAGS.flags_by_module_dict().values()
            for f in module_flags
            if f not in own and "." not in f.name
        }
        if others:
            lines = (_describe_flag(f) for _, f in sorted(others.items()))
            parts.append("other flags (absl):\n" + "\n".join(lines))
    config_flag = _config_flag()
    if config_flag is not None:
        source = _shown_path(config_flag.config_filename)
        parts.append(
            f"config fields, as {source} and the overrides set them\n"
            "(set any with --config.SECTION.FIELD=VALUE):\n" + describe(config_flag.value)
        )
    return "\n\n".join(p for p in parts if p)


def _is_required(flag: Any) -> bool:
    """Whether a validator of `flag` rejects None (absl's `required=True`)."""
    if flag.default is not None:
        return False
    for validator in getattr(flag, "validators", []):
        try:
            if not validator.checker(None):
                return True
        except Exception:
            continue
    return False


def _describe_flag(flag: Any) -> str:
    """`  --name   help (default: value)`, wrapped to 100 columns."""
    default = flag.default
    if flag.boolean:
        spec, default = f"--[no]{flag.name}", None if default is None else str(default).lower()
    else:
        spec = f"--{flag.name}"
        if hasattr(type(flag), "config_filename"):  # its default is the file, not the config in it
            default = _shown_path(flag.default_as_str.strip("'"))
        default = repr(default) if default == "" else default
    if _is_required(flag):
        text = f"{flag.help} (required)"
    else:  # a None default is described by the help text
        text = flag.help if default is None else f"{flag.help} (default: {default})"
    indent = " " * 28
    first = f"  {spec}".ljust(28)
    wrap = dict(width=100, subsequent_indent=indent, break_on_hyphens=False)
    if len(first) > 28:  # no room in the first column: the help starts on the next line
        return f"  {spec}\n" + textwrap.fill(text, initial_indent=indent, **wrap)
    return textwrap.fill(text, initial_indent=first, **wrap)


def _shown_path(path: str) -> str:
    """`path` relative to the working directory if it lies under it."""
    relative = os.path.relpath(path) if os.path.isabs(path) else path
    return path if relative.startswith("..") else relative
