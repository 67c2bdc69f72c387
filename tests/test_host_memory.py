"""rz.host_memory: the C allocator's free pages go back to the system after every compilation."""

import jax
import jax.numpy as jnp

from rz import host_memory


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
