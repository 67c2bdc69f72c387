"""A chunk's keys, values and positions stored into a KV cache's block pool in place
(rz_kernels/cpu/cache_write.cc).

The writes are scatters: a token's row of every head goes to its block and slot. XLA:CPU's
classic fusion emitters, which compile a step with much less memory than its MLIR ones, expand a
scatter into a loop of several small kernels per token and layer. On CPU, with the kernels built,
each write is instead one custom call that updates the pool's buffer in place (XLA aliases it);
the scatters stay the reference and every other backend's path.
"""

import jax
import jax.numpy as jnp
import numpy as np

from rz_kernels import cpu_ffi


def describe_paths(backend: str) -> list[dict]:
    """Which implementation writes a chunk of any length into a block pool on `backend`."""
    if backend == "cpu" and cpu_ffi.available():
        return [{"op": "kv_cache_write", "backend": backend, "path": "cpu_ffi", "t_min": 1, "t_max": None,
                 "note": f"variant {cpu_ffi.selected().name}"}]
    return [{"op": "kv_cache_write", "backend": backend, "path": "xla_scatter", "t_min": 1, "t_max": None}]


def scatter_rows(pool: jax.Array, rows: jax.Array, blocks: jax.Array, slots: jax.Array) -> jax.Array:
    """The reference: pool [N, H, S, W] with rows [B, T, H, W] at blocks, slots int32 [B, T]; a
    block or slot outside the pool is dropped."""
    return pool.at[blocks, :, slots].set(rows.astype(pool.dtype), mode="drop")


def scatter_positions(pool: jax.Array, positions: jax.Array, blocks: jax.Array, slots: jax.Array, started: jax.Array,
                      empty: int) -> jax.Array:
    """The reference: pool int32 [N, S] with every slot of the blocks in started [B, T] set to
    empty, then positions [B, T] at blocks, slots; indices outside the pool are dropped."""
    cleared = pool.at[started].set(empty, mode="drop")
    return cleared.at[blocks, slots].set(positions, mode="drop")


def write_rows(pool: jax.Array, rows: jax.Array, blocks: jax.Array, slots: jax.Array) -> jax.Array:
    """scatter_rows, by the kernel on CPU where it is built."""
    rows = rows.astype(pool.dtype)
    blocks, slots = blocks.astype(jnp.int32), slots.astype(jnp.int32)
    if not cpu_ffi.available():
        return scatter_rows(pool, rows, blocks, slots)

    def kernel(pool, rows, blocks, slots):
        call = jax.ffi.ffi_call(
            cpu_ffi.write_rows_target(cpu_ffi.active()), jax.ShapeDtypeStruct(pool.shape, pool.dtype), input_output_aliases={0: 0}
        )
        return call(pool, rows, blocks, slots)

    return jax.lax.platform_dependent(pool, rows, blocks, slots, cpu=kernel, default=scatter_rows)


def write_positions(pool: jax.Array, positions: jax.Array, blocks: jax.Array, slots: jax.Array, started: jax.Array,
                    empty: int) -> jax.Array:
    """scatter_positions, by the kernel on CPU where it is built."""
    positions, blocks, slots, started = (a.astype(jnp.int32) for a in (positions, blocks, slots, started))
    if not cpu_ffi.available():
        return scatter_positions(pool, positions, blocks, slots, started, empty)

    def kernel(pool, positions, blocks, slots, started):
        call = jax.ffi.ffi_call(
            cpu_ffi.write_positions_target(cpu_ffi.active()), jax.ShapeDtypeStruct(pool.shape, pool.dtype),
            input_output_aliases={0: 0},
        )
        return call(pool, positions, blocks, slots, started, empty=np.int32(empty))

    def reference(pool, positions, blocks, slots, started):
        return scatter_positions(pool, positions, blocks, slots, started, empty)

    return jax.lax.platform_dependent(pool, positions, blocks, slots, started, cpu=kernel, default=reference)
