"""Zeros that become resident only where they are written: a KV cache's block pool
(rz_kernels/cpu/zero_pages.cc says how).

A server's pool holds every slot's whole context, and filling it with zeros makes all of it
resident before any request arrives; llama.cpp clears its cache the same way. With the CPU
kernels built, on Linux, the pool's pages are instead mapped on the first write into each
block, so a server's memory follows the blocks its requests have used. The values are the same
zeros either way.
"""

import jax
import jax.numpy as jnp

from rz_kernels import cpu_ffi


def zeros(shape: tuple[int, ...], dtype) -> jax.Array:
    """jnp.zeros(shape, dtype), made by the kernel on CPU where it is built."""
    if not cpu_ffi.available():
        return jnp.zeros(shape, dtype)
    call = jax.ffi.ffi_call(cpu_ffi.zero_pages_target(cpu_ffi.active()), jax.ShapeDtypeStruct(shape, dtype))
    return jax.lax.platform_dependent(cpu=call, default=lambda: jnp.zeros(shape, dtype))
