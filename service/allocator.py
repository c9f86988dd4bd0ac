"""Tunes glibc's malloc for governor's allocation pattern, once, at start-up.

Each request's protobuf parse allocates an upb arena of a few hundred KiB and frees it a moment
later. Above glibc's default mmap threshold (128 KiB, raised only slowly by its dynamic rule)
such an arena can be a fresh mmap whose pages fault in one by one (~2 µs each on the 2-core
machine): in a tight loop that was half the cost of validating a request. Serving these from the
heap and keeping freed memory for reuse removes the faults from the start, not only once glibc's
dynamic threshold has caught up.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Free memory at the top of the heap is returned to the system past this.
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024


def tune() -> bool:
    """Raise glibc's mmap and trim thresholds; False where malloc is not glibc's (no change)."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
