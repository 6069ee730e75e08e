"""Keep freed tensor memory in the process (glibc only).

The recorded forward keeps every activation and the sweep allocates relevance maps of the same
sizes, so each request asks for tens of megabytes in buffers of a few megabytes. glibc serves
those from fresh ``mmap`` regions and returns them to the OS when freed, so every request pays
the page faults again: about half the time of a MobileNet forward pass on two cores. Serving
them from a heap that is not trimmed removes that cost, as jemalloc or tcmalloc would.

A process-wide setting, so it is opt-in: the service worker and the benchmarks call
``tune_allocator()``; a library user may too. The price is that the process keeps its peak
memory reserved.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's upper bound on 64-bit systems
_TRIM_THRESHOLD = 2**31 - 1


def tune_allocator() -> bool:
    """Serve buffers up to 32 MB from the heap and never trim it. Returns whether it applied
    (False where the C library is not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )
