"""What the command lines share: config paths that work from any directory, a console without the INFO logs of JAX
and orbax, and errors as one line."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Callable

from absl import app, flags
from absl import logging as absl_logging

_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False, "Show JAX's INFO logs (backend probing) and orbax's "
                                  "logs (about 45 lines per checkpoint save; its errors, which the project also "
                                  "reports in one line).")


def shipped_config(value: str) -> str:
    """`value` (a `--config` path, optionally `:args`) as given if it exists; else, for `configs/<name>.py`, that
    file of the installed `configs` package, so the documented `--config=configs/sr64.py` works from any directory."""
    path, colon, args = value.partition(":")
    parts = Path(path).parts
    if os.path.exists(path) or len(parts) < 2 or parts[0] != "configs":
        return value
    spec = importlib.util.find_spec("configs")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        if Path(root, *parts[1:]).is_file():
            return str(Path(root, *parts[1:])) + colon + args
    return value


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing (for `app.run(..., flags_parser=parse_flags)`), with `--config` resolved by `shipped_config`."""
    resolved, after_config = [], False
    for i, arg in enumerate(argv):
        if i > 0 and after_config:
            arg = shipped_config(arg)
        elif i > 0 and arg.startswith("--config="):
            arg = "--config=" + shipped_config(arg.removeprefix("--config="))
        after_config = i > 0 and arg == "--config"
        resolved.append(arg)
    try:
        return app.parse_flags_with_usage(resolved)
    except (AttributeError, KeyError) as error:  # an override of a key the config lacks, or a bug in the file
        if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        raise SystemExit(_config_error(error, resolved)) from None


def _config_error(error: Exception, argv: list[str]) -> str:
    """One line for an override of a config key that does not exist (with ml_collections' suggestion, if any), or
    else for an error raised while the config file was built."""
    text = str(error)
    hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    key = hint.group(2) if hint else next(iter(re.findall(r"(\w+)", text)), "?")
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a.split("=")[0].split(".")),
                None)
    if flag is None:
        return f"--config: {type(error).__name__} while building the config: {text} (run with {TRACEBACK_VARIABLE}=1 " \
               "for the traceback)"
    return f"{flag}: the config has no key {key!r}" + (f"; did you mean {hint.group(1)!r}?" if hint else "")


class _HideLibraryInfo(logging.Filter):
    """Drops JAX's records below WARNING and all of orbax's, whose failures the project reports itself. Orbax logs
    through absl's logger and, in some releases, Python's root logger, so records are told apart by their file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" in record.pathname:
            return False
        return record.levelno >= logging.WARNING or f"{os.sep}jax{os.sep}" not in record.pathname


def quiet_libraries() -> None:
    """Keeps JAX's INFO logs (backend probing) and orbax's logs (each checkpoint save and restore) off the console
    unless `--library_logs` is given. Call it after flag parsing. The filter sits on absl's handler, which every
    logger's records reach."""
    handler = absl_logging.get_absl_handler()
    for old in [f for f in handler.filters if isinstance(f, _HideLibraryInfo)]:
        handler.removeFilter(old)
    if not _LIBRARY_LOGS.value:
        handler.addFilter(_HideLibraryInfo())


TRACEBACK_VARIABLE = "VDVAE_SR_TRACEBACK"

# Errors whose messages are written for users (a path, key or value and what to do); others get the hint below.
_USER_ERRORS = (OSError, ValueError, ImportError)


def one_line_errors(main: Callable) -> Callable:
    """`main` (for `app.run`) with an exception turned into its message on stderr and exit status 1, without a
    traceback unless the environment sets VDVAE_SR_TRACEBACK=1."""

    @functools.wraps(main)
    def wrapped(*args):
        try:
            return main(*args)
        except Exception as error:
            if os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
                raise
            message = str(error) or type(error).__name__
            if not isinstance(error, _USER_ERRORS):
                message = f"{type(error).__name__}: {message} (run with {TRACEBACK_VARIABLE}=1 for the traceback)"
            raise SystemExit(message) from None

    return wrapped
