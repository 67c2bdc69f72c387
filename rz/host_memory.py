"""Giving the C allocator's free pages back to the system after one-off large work."""

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


def return_free_pages() -> None:
    """Return the C allocator's free pages to the system: after one-off large work (tokenizing a
    very long text) on one of many threads, each with its own arena, they would stay resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
