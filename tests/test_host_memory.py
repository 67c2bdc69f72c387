"""rz.host_memory: the C allocator's free pages go back to the system after every compilation, and
its threads share one arena; what tracing kept goes after a step compiles; host values reach the
device without compiling."""

import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rz import host_memory

_TRACED = "/jax/core/compile/jaxpr_trace_duration"
_COMPILED = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def jax_events():
    """The names of the duration events JAX records inside the block (tracing, compiling)."""
    events = []

    def listener(event, duration, **kwargs):
        events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_every_compilation_returns_the_free_pages(monkeypatch):
    host_memory.return_free_pages_after_compiles()
    host_memory.return_free_pages_after_compiles()  # a second call registers nothing more
    calls = []
    monkeypatch.setattr(host_memory, "return_free_pages", lambda: calls.append(1))
    x = jnp.ones(7919)
    step = jax.jit(lambda x: jnp.cumsum(x * 3.25))
    step(x).block_until_ready()  # compiles (or loads from the persistent cache)
    after_compiling = len(calls)
    assert after_compiling >= 1
    step(x).block_until_ready()  # compiled already
    assert len(calls) == after_compiling


def test_a_fresh_array_is_zeroed_writable_and_in_a_mapping_of_its_own():
    import mmap
    import weakref

    import numpy as np

    array = host_memory.fresh_array((3, 5), np.float32)
    assert array.shape == (3, 5) and array.dtype == np.float32 and array.flags.writeable
    assert not array.any()
    array[1:] = 2.5
    assert array.sum() == 2.5 * 10
    # Its memory is an anonymous mapping, not numpy's (which asks for huge pages), and goes with it.
    owner = array
    while isinstance(owner, np.ndarray):
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    assert isinstance(owner, mmap.mmap)
    mapping = weakref.ref(owner)
    del owner
    del array
    assert mapping() is None
    assert host_memory.fresh_array((0, 4), np.float32).shape == (0, 4)


def test_dropping_what_tracing_kept_keeps_the_compiled_steps_and_eager_operations():
    from jax._src import util

    step = jax.jit(lambda x: jnp.cumsum(x * 3.25))
    x = jnp.ones(7907)
    expected = np.asarray(step(x))
    (x + 1.5).block_until_ready()  # an eager operation, compiled once
    host_memory.drop_tracing_caches()
    holding = {
        getattr(getattr(cache, "__wrapped__", None), "__name__", None)
        for cache in util._caches
        if hasattr(cache, "cache_info") and cache.cache_info().currsize
    }
    assert holding <= host_memory._KEPT_CACHES
    with jax_events() as events:
        again = np.asarray(step(x))
        (x + 1.5).block_until_ready()
    assert _TRACED not in events and _COMPILED not in events
    np.testing.assert_array_equal(again, expected)


def test_a_device_copy_compiles_nothing_and_is_a_copy():
    host = np.arange(7919, dtype=np.int64)[None]  # a shape nothing has compiled for
    with jax_events() as events:
        on_device = host_memory.device_copy(host, np.int32)
    assert _COMPILED not in events
    assert on_device.dtype == jnp.int32 and on_device.shape == (1, 7919)
    assert not on_device.committed  # placed as jnp.asarray places it
    host[0, :3] = -7  # the caller's buffer changes; the device's copy does not
    np.testing.assert_array_equal(np.asarray(on_device), np.arange(7919)[None])
    assert host_memory.device_copy([[], []], np.int32).shape == (2, 0)
    assert host_memory.device_copy(3.5).dtype == jnp.float32


def test_a_sampler_state_compiles_nothing_after_the_tracing_caches_drop():
    """The engine drops the tracing caches after each step compiles; a request's fresh sampler
    state must not compile its seeding again on the next request."""
    from rz.request import SamplingParams
    from rz.sampling import SamplerState

    rows, histories = [SamplingParams(seed=5), SamplingParams(seed=9)], [[1, 2], [3]]
    first = SamplerState.create(rows, histories)
    host_memory.drop_tracing_caches()
    with jax_events() as events:
        again = SamplerState.create(rows, histories)
    assert _TRACED not in events and _COMPILED not in events
    np.testing.assert_array_equal(jax.random.key_data(again.keys), jax.random.key_data(first.keys))


_ARENAS_AFTER_THREADS = """
import ctypes, ctypes.util, sys, threading
from rz import host_memory
if sys.argv[1] == "share":
    host_memory.share_one_arena()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
ready, release = threading.Barrier(5), threading.Event()
def allocate():
    libc.malloc(4096)  # the thread's first allocation takes (or creates) its arena
    ready.wait()
    release.wait()
threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
ready.wait()
libc.malloc_stats()  # "Arena N:" per arena, on stderr
release.set()
"""


def arenas_used(mode: str, env: dict) -> int:
    """Arenas glibc holds after four threads allocated at once, with share_one_arena called or not."""
    result = subprocess.run([sys.executable, "-c", _ARENAS_AFTER_THREADS, mode], capture_output=True, text=True, env=env,
                            check=True, timeout=60)
    return result.stderr.count("Arena ")


GLIBC = sys.platform.startswith("linux") and host_memory._libc_function("mallopt") is not None


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_threads_share_one_arena_unless_the_user_chose(monkeypatch):
    env = {key: value for key, value in os.environ.items() if key not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")}
    assert arenas_used("plain", env) > 1
    assert arenas_used("share", env) == 1
    # The user's own setting stands.
    assert arenas_used("share", {**env, "MALLOC_ARENA_MAX": "3"}) == 3
