"""The command lines' restart with glibc's huge-page tunable: when, with what, and that it gives huge pages."""

import os
import subprocess
import sys
import textwrap

import pytest

from vdvae_sr_jax import huge_pages

ENV = {"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}


def test_the_restart_keeps_the_command_line_and_adds_the_tunable_to_the_users_own(monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(huge_pages, "glibc_version", lambda: (2, 36))
    monkeypatch.setattr(huge_pages, "kernel_allows", lambda: True)
    monkeypatch.setattr(sys, "orig_argv", ["python3", "-X", "utf8", "-m", "vdvae_sr_jax.main", "--config=c.py"])
    argv, env = huge_pages.restart_command(ENV)
    assert argv == [sys.executable, "-X", "utf8", "-m", "vdvae_sr_jax.main", "--config=c.py"]
    assert env == dict(ENV, GLIBC_TUNABLES="glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert huge_pages.restart_command({"PATH": "/usr/bin"})[1]["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@pytest.mark.parametrize("case", ["restarted", "opted out", "hugetlb=0", "old glibc", "musl", "thp never", "macos"])
def test_no_restart_where_it_would_loop_is_unwanted_or_does_nothing(monkeypatch, tmp_path, case):
    monkeypatch.setattr(sys, "platform", "darwin" if case == "macos" else "linux")
    version = {"old glibc": (2, 34), "musl": None}.get(case, (2, 36))
    monkeypatch.setattr(huge_pages, "glibc_version", lambda: version)
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n" if case == "thp never" else "always [madvise] never\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    env = {"restarted": dict(ENV, GLIBC_TUNABLES="glibc.malloc.hugetlb=1"), "opted out": dict(ENV, **{
        huge_pages.OPT_OUT: "1"}), "hugetlb=0": dict(ENV, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")}.get(case, ENV)
    assert huge_pages.restart_command(env) is None
    assert huge_pages.restart_command(ENV) is not None or case in ("old glibc", "musl", "thp never", "macos")


# Maps 256 MiB through malloc (above its mmap threshold), touches every byte and counts the page faults it took.
FAULTS = textwrap.dedent("""
    import ctypes, os, resource
    from vdvae_sr_jax import huge_pages
    huge_pages.restart_with_huge_pages()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    size = 256 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(libc.malloc(size), 1, size)
    print(os.environ.get("GLIBC_TUNABLES"), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


@pytest.mark.skipif(huge_pages.restart_command({}) is None, reason="no glibc 2.35+ with transparent huge pages here")
def test_the_restarted_process_maps_large_allocations_in_huge_pages():
    def run(**env):
        out = subprocess.run([sys.executable, "-c", FAULTS], env=dict(os.environ, **env), capture_output=True,
                             text=True, check=True).stdout.split()
        return out[0], int(out[1])

    (tunables, faults), (off, small_pages) = run(), run(**{huge_pages.OPT_OUT: "1"})
    assert tunables.endswith(huge_pages.TUNABLE) and off == os.environ.get("GLIBC_TUNABLES", "None")
    assert small_pages >= (256 << 20) // 4096  # one fault per 4 KiB page
    assert faults < small_pages / 20, (faults, small_pages)
