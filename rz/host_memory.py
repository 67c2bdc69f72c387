"""Host memory: the C allocator's free pages given back to the system after one-off large work,
and large result arrays in pages of their own."""

import ctypes
import ctypes.util
import functools
import mmap
import os

import numpy as np


@functools.cache
def _libc_function(name: str):
    """A glibc function (malloc_trim, mallopt), or None where the C library has none (macOS, musl)."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None


_M_ARENA_MAX = -8  # glibc's malloc.h


@functools.cache
def share_one_arena() -> None:
    """From now on, threads that first allocate take glibc's one main arena rather than one each,
    unless the user chose (MALLOC_ARENA_MAX, or glibc.malloc tunables).

    XLA's pool threads each got an arena of their own, and each kept freed pages of the buffers it
    had held, which malloc_trim after compiling did not return in full: one arena lowered an
    engine's peak resident memory and did not slow its steps (benchmarks/results/memory-session31.md).
    Called before JAX starts its threads.
    """
    if "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(_M_ARENA_MAX, 1)


def return_free_pages() -> None:
    """Return the C allocator's free pages to the system: after one-off large work (tokenizing a
    very long text) on one of many threads, each with its own arena, they would stay resident."""
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


# The events JAX reports when it has compiled a program or loaded one from its persistent cache.
_COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")


@functools.cache
def return_free_pages_after_compiles() -> None:
    """From now on, return_free_pages after every compilation in this process.

    XLA frees most of what a compilation allocates, but glibc keeps the freed pages in its arenas,
    so without this an engine's resident memory grows by each compilation's peak working set
    rather than by what the executable keeps, and the next compilation's peak starts from there.
    """
    import jax.monitoring

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            return_free_pages()

    jax.monitoring.register_event_duration_secs_listener(listener)


# Kept by drop_tracing_caches: eager operations' compiled callables. Dropped, each would compile
# again on its next use.
_KEPT_CACHES = frozenset({"xla_primitive_callable"})


def drop_tracing_caches() -> None:
    """Drop what JAX kept from tracing and lowering steps (jaxprs, lowered modules), then return
    the freed pages.

    A compiled step stays in jit's C++ dispatch cache, which is all its later calls with the same
    shapes use; what tracing kept is needed only to trace the same function at the same shapes
    again, and it is a large part of an engine's memory (benchmarks/results/memory-session25.md).
    A later call that misses the dispatch cache traces again, as a new shape would.
    `jax.clear_caches` would drop the compiled steps too.
    """
    try:
        from jax._src import util

        caches = list(util._caches)
    except (ImportError, AttributeError):  # a JAX without them keeps its caches: more memory, the same results
        return
    for cache in caches:
        if getattr(getattr(cache, "__wrapped__", None), "__name__", None) not in _KEPT_CACHES:
            cache.cache_clear()
    return_free_pages()


def device_copy(values, dtype=None):
    """A copy of host values (a NumPy array, a list, a scalar) on the default device, uncommitted, as
    jnp.asarray gives it, but with nothing compiled: jnp.asarray of a NumPy array runs an identity
    computation compiled once per shape, and an engine's per-request shapes (block tables, prompt
    chunks) would keep compiling them, and holding each. The copy is taken first because on
    CPU the device array may share the host buffer, which callers go on to change.
    """
    import jax

    return jax.device_put(np.array(values, dtype=dtype))


def fresh_array(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed array in an anonymous mapping of its own, unmapped when the array is collected.

    numpy asks the kernel for transparent huge pages for every large array, and where the THP
    defrag setting is `madvise` (a common default) the first touch of that memory stalls in direct
    compaction: filling a scoring pass's logits, a few GB, then takes several times the copy
    itself. A plain mapping gets ordinary pages, or huge pages without the stall where THP is `always`.
    """
    count = int(np.prod(shape))
    buffer = mmap.mmap(-1, max(count * np.dtype(dtype).itemsize, 1))
    return np.frombuffer(buffer, dtype, count=count).reshape(shape)
