"""glibc heap settings for the CPU passes of the CROWN family (docs/design.md, "Linear relaxation").

A backward pass on the CPU allocates and frees tensors of a few MB at every step. With glibc's default
settings the top of the heap is handed back to the kernel and taken again, page by page (every page
fault zero-fills 4 KB), or such tensors are mapped and unmapped: on the trained cnn5 of
``bench/certify_vs_peer.py`` that costs a quarter of the sound float64 CROWN time. :func:`keep_freed`
keeps freed memory in the process instead (tensors below 32 MB come from the heap, whose top is
returned only once 256 MB of it are free): a process that ran ``crown_margins`` on the CPU keeps up to
that much more memory mapped. Nothing changes on other C libraries, or when the environment sets
these glibc settings itself (:func:`environment_decides`: those win, and ``MALLOC_TRIM_THRESHOLD_``
is also the way to opt out).
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic threshold on 64-bit systems
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
OWN_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_taken: Optional[bool] = None  # the outcome, once per process


def environment_decides() -> bool:
    """Whether the environment sets glibc's heap thresholds (:data:`OWN_SETTINGS`, or a
    ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``)."""
    return any(key in os.environ for key in OWN_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed() -> bool:
    """Once per process on Linux with glibc: allocations below :data:`MMAP_THRESHOLD` from the heap,
    whose top goes back to the kernel once :data:`TRIM_THRESHOLD` of it is free. Returns whether the
    settings are those (False: another C library, or the environment decides)."""
    global _taken
    if _taken is None:
        _taken = sys.platform.startswith("linux") and not environment_decides() and _mallopt()
    return _taken


def _mallopt() -> bool:
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the process's C library
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
