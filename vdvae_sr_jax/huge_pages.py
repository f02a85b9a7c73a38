"""Transparent huge pages for the process's large host allocations, through glibc's `glibc.malloc.hugetlb` tunable.

XLA:CPU allocates a program's temporaries afresh on every call, and the kernel maps them in and zeroes them one page
at a time on first touch: with 2 MiB pages instead of 4 KiB ones, 512 times fewer page faults. glibc reads its
tunables only when a process starts, so the command lines restart themselves once with the tunable set, before
anything is imported that allocates.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

OPT_OUT = "VDVAE_SR_NO_HUGE_PAGES"  # set to 1 to keep the process as started
TUNABLE = "glibc.malloc.hugetlb=1"  # glibc 2.35+: madvise(MADV_HUGEPAGE) on the memory malloc maps
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
    except (AttributeError, ValueError, OSError):
        return None
    return (int(major), int(minor)) if name == "glibc" else None


def kernel_allows() -> bool:
    """Whether Linux gives huge pages to memory that asks for them (its THP mode is `always` or `madvise`)."""
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def restart_command(environ=os.environ) -> tuple[list[str], dict] | None:
    """The (argv, environment) to re-execute this process with, or None when the tunable is set already, the user
    opted out (OPT_OUT), or it would do nothing (not Linux, glibc older than 2.35, THP off)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if (sys.platform != "linux" or environ.get(OPT_OUT) or "glibc.malloc.hugetlb" in tunables
            or (glibc_version() or (0, 0)) < (2, 35) or not kernel_allows()):
        return None
    return [sys.executable, *sys.orig_argv[1:]], dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables,
                                                                                                    TUNABLE])))


def restart_with_huge_pages() -> None:
    """Replaces this process (same pid, arguments and interpreter options) by one with the tunable set, where
    `restart_command` gives one; call it first thing in a `__main__`."""
    command = restart_command()
    if command is not None:
        argv, environ = command
        os.execve(argv[0], argv, environ)
