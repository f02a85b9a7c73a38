"""What the command lines share: config paths that work from any directory, and a console without the INFO logs of
JAX and orbax."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from absl import app, flags
from absl import logging as absl_logging

_LIBRARY_LOGS = flags.DEFINE_bool("library_logs", False, "Show the INFO logs of JAX (backend probing) and orbax "
                                  "(about 45 lines per checkpoint save).")


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
    return app.parse_flags_with_usage(resolved)


class _HideLibraryInfo(logging.Filter):
    """Drops JAX's and orbax's records below WARNING. Orbax logs through absl's logger and, in some releases, Python's
    root logger, so records are told apart by the file that made them."""

    LIBRARIES = (f"{os.sep}jax{os.sep}", f"{os.sep}orbax{os.sep}")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(lib in record.pathname for lib in self.LIBRARIES)


def quiet_libraries() -> None:
    """Keeps JAX's and orbax's INFO logs (backend probing; each checkpoint save and restore) off the console unless
    `--library_logs` is given. Call it after flag parsing. The filter sits on absl's handler, which every logger's
    records reach."""
    handler = absl_logging.get_absl_handler()
    for old in [f for f in handler.filters if isinstance(f, _HideLibraryInfo)]:
        handler.removeFilter(old)
    if not _LIBRARY_LOGS.value:
        handler.addFilter(_HideLibraryInfo())
