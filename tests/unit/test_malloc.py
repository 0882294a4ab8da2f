"""The allocator settings the worker applies at start."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from worker.malloc import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or not ctypes.util.find_library("c"), reason="glibc only")
def test_glibc_takes_the_settings() -> None:
    # False would mean a value glibc refuses (each is checked against its limits), not a missing libc.
    assert keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
