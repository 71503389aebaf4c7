"""keep_freed_memory: a freed large block is reused instead of mapped and zero-filled again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from crl import allocator

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# Allocates, touches and frees 64 MiB with glibc's malloc, then counts the page faults of a
# second allocation of the same size: glibc's default serves it with a fresh mmap (16,384
# faults of 4 KiB pages); with the freed block kept, it reuses already-mapped pages.
_PROBE = textwrap.dedent(
    """
    import ctypes, resource
    from crl.allocator import keep_freed_memory
    applied = keep_freed_memory()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = 64 * 2**20
    block = libc.malloc(n); ctypes.memset(block, 1, n); libc.free(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(n); ctypes.memset(block, 1, n)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("CRL_KEEP_FREED_MEMORY", *allocator._USER_SETTINGS)}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=clean | env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not GLIBC, reason="mallopt settings exist on glibc only")
def test_freed_block_is_reused_only_with_the_settings():
    applied, faults = _probe()
    assert applied and faults < 2_000
    off, faults_off = _probe(CRL_KEEP_FREED_MEMORY="0")
    assert not off and faults_off > 10_000  # 64 MiB / 4 KiB pages = 16,384
    user, faults_user = _probe(MALLOC_TRIM_THRESHOLD_="131072")
    assert not user and faults_user > 10_000  # the user's own malloc setting wins


def test_crl_command_applies_the_settings(monkeypatch):
    from click.testing import CliRunner

    from crl.cli import main

    calls: list[int] = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    result = CliRunner().invoke(main, ["list", "methods"])
    assert result.exit_code == 0, result.output
    assert calls == [1]
