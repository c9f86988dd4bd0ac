"""The allocator tuning applied at start-up."""

import platform

from service import allocator


def test_tune_succeeds_on_glibc() -> None:
    """On glibc (Debian, the supported platform) both thresholds are accepted, and applying them
    again is harmless."""
    assert platform.libc_ver()[0] == "glibc"
    assert allocator.tune() is True
    assert allocator.tune() is True


def test_thresholds_are_within_glibc_limits() -> None:
    """The mmap threshold is at most glibc's 64-bit ceiling (32 MiB), past which mallopt refuses."""
    assert allocator.MMAP_THRESHOLD_BYTES <= 32 * 1024 * 1024
    assert allocator.TRIM_THRESHOLD_BYTES >= allocator.MMAP_THRESHOLD_BYTES
