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
