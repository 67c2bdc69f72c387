"""rz_kernels.zero_pages: zeros whose untouched pages are not resident (a KV cache's block pool)."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rz_kernels import cpu_ffi, zero_pages

pytestmark = pytest.mark.skipif(not cpu_ffi.available(), reason="the C++ CPU kernels cannot be built here")


def resident_mib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.parametrize(
    "shape, dtype",
    [((3,), jnp.int8), ((1000, 7), jnp.int8), ((5, 4099), jnp.float32), ((64, 3, 64, 64), jnp.float16), ((9, 33), jnp.bfloat16)],
)
def test_every_byte_is_zero(shape, dtype):
    zeros = jax.jit(lambda: zero_pages.zeros(shape, dtype))()
    assert zeros.shape == shape and zeros.dtype == dtype
    assert not np.asarray(zeros).view(np.uint8).any()


def test_memory_that_held_data_before_reads_as_zeros():
    # A buffer XLA reuses after freeing ones of the same size is dirty, not fresh from the system.
    make = jax.jit(lambda: zero_pages.zeros((1 << 22,), jnp.float32))
    for _ in range(3):
        ones = jnp.ones((1 << 22,), jnp.float32)
        ones.block_until_ready()
        del ones
        assert not np.asarray(make()).any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory is read from /proc")
def test_untouched_pages_are_not_resident_until_written():
    make = jax.jit(lambda: zero_pages.zeros((256 << 20,), jnp.uint8))
    make().block_until_ready()  # compiled, and its first buffer freed
    # Half the pool written in place, as a step writes a donated KV pool: compiled before measuring.
    write_half = jax.jit(lambda pool: pool.at[: 128 << 20].set(1), donate_argnums=0)
    write_half = write_half.lower(jax.ShapeDtypeStruct((256 << 20,), jnp.uint8)).compile()
    before = resident_mib()
    pool = make()
    pool.block_until_ready()
    assert resident_mib() - before < 64, "a 256 MiB pool of zeros became resident before any write"
    written = write_half(pool)
    written.block_until_ready()
    grown = resident_mib() - before
    assert 96 <= grown < 192, f"writing 128 MiB of a 256 MiB pool in place made {grown} MiB resident"
    assert int(written[(128 << 20) - 1]) == 1 and int(written[128 << 20]) == 0
