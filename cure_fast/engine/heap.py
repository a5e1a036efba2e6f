"""glibc heap settings for the CPU passes of the CROWN family (docs/design.md, "Linear relaxation").

A backward pass on the CPU allocates and frees tensors of a few MB at every step. With glibc's default
settings the top of the heap is handed back to the kernel and taken again, page by page (every page
fault zero-fills 4 KB), or such tensors are mapped and unmapped: on the trained cnn5 of
``bench/certify_vs_peer.py`` that costs a quarter of the sound float64 CROWN time. :func:`keep_freed`
keeps freed memory in the process instead (tensors below 32 MB come from the heap, whose top is
returned only once 256 MB of it are free). Nothing changes on other C libraries, or when the
process's environment sets these glibc settings itself (:data:`OWN_SETTINGS`: those win).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic threshold on 64-bit systems
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
OWN_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_done = False


def keep_freed() -> bool:
    """Once per process on glibc: allocations below :data:`MMAP_THRESHOLD` from the heap, whose top
    goes back to the kernel once :data:`TRIM_THRESHOLD` of it is free. Returns whether the settings
    are those (False: another C library, or the environment chose)."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or any(key in os.environ for key in OWN_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
