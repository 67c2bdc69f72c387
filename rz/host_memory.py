"""Giving host memory back to the system after the engine's one-off work.

Compiling a step (tracing, lowering, loading the executable) and retiring an engine leave tens to
hundreds of MiB of freed memory in the C allocator's arenas, where it stays resident: measured on
SmolLM2 135M, a 1-slot engine replaced by an 8-slot one left the process 215 MiB above what it
used. Both are rare (once per compiled shape, once per larger batch), so a full collection and a
trim after them cost nothing that a request would notice.
"""

import ctypes
import ctypes.util
import gc
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


def release_unused() -> None:
    """Free unreachable Python objects (an engine and its jitted steps form reference cycles, so
    dropping the last reference does not free them), then return free heap pages to the system."""
    gc.collect()
    return_free_pages()


def return_free_pages() -> None:
    """Return the C allocator's free pages to the system: after one-off large work (tokenizing a
    very long text) on one of many threads, each with its own arena, they would stay resident."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
