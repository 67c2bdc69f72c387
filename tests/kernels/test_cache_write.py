"""rz_kernels.cache_write: a chunk's rows and positions into a KV block pool in place, equal to the scatters it replaces."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rz_kernels import cache_write, cpu_ffi

pytestmark = pytest.mark.skipif(not cpu_ffi.available(), reason="the C++ CPU kernels cannot be built here")

N_BLOCKS, HEADS, BLOCK, WIDTH = 6, 3, 4, 8
DROPPED = 1 << 30  # rz.kv_cache.DROPPED: a padding token's block
EMPTY = -1


def _writes(rng, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (block, slot) pairs for batch x length tokens, some dropped: past the pool, or a slot past the block."""
    pairs = rng.permutation(N_BLOCKS * BLOCK)[: batch * length]
    blocks, slots = (pairs // BLOCK).astype(np.int32), (pairs % BLOCK).astype(np.int32)
    blocks[::5] = DROPPED
    slots[3::7] = BLOCK + 2
    return blocks.reshape(batch, length), slots.reshape(batch, length)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16, jnp.int8])
@pytest.mark.parametrize("batch, length", [(1, 1), (2, 5), (1, 13)])
def test_rows_land_where_the_scatter_puts_them(dtype, batch, length):
    rng = np.random.default_rng(batch * 100 + length)
    pool = jnp.asarray(rng.normal(size=(N_BLOCKS, HEADS, BLOCK, WIDTH)) * 50).astype(dtype)
    rows = jnp.asarray(rng.normal(size=(batch, length, HEADS, WIDTH)) * 50).astype(dtype)
    blocks, slots = _writes(rng, batch, length)
    expected = cache_write.scatter_rows(pool, rows, blocks, slots)
    written = jax.jit(cache_write.write_rows, donate_argnums=0)(pool, rows, blocks, slots)
    np.testing.assert_array_equal(np.asarray(written).view(np.uint8), np.asarray(expected).view(np.uint8))


def test_positions_clear_their_started_blocks_then_land():
    rng = np.random.default_rng(7)
    pool = jnp.asarray(rng.integers(0, 100, size=(N_BLOCKS, BLOCK)), jnp.int32)
    blocks, slots = _writes(rng, 2, 6)
    positions = jnp.asarray(rng.integers(0, 1000, size=blocks.shape), jnp.int32)
    started = np.where(slots == 0, blocks, DROPPED).astype(np.int32)
    started[0, 0] = 1  # a block cleared that the chunk writes nothing else into
    expected = cache_write.scatter_positions(pool, positions, blocks, slots, started, EMPTY)
    written = jax.jit(partial(cache_write.write_positions, empty=EMPTY), donate_argnums=0)(pool, positions, blocks, slots, started)
    np.testing.assert_array_equal(np.asarray(written), np.asarray(expected))
    assert (np.asarray(expected) == EMPTY).any(), "the case clears no slot"


def test_writes_in_a_loop_over_layers_update_the_carried_pool():
    # As a step's loop over layers: each layer writes its own region of one pool carried through the loop.
    rng = np.random.default_rng(3)
    n_layers = 3
    pool = jnp.zeros((n_layers * N_BLOCKS, HEADS, BLOCK, WIDTH), jnp.float16)
    rows = jnp.asarray(rng.normal(size=(n_layers, 1, 5, HEADS, WIDTH)), jnp.float16)
    blocks, slots = _writes(rng, 1, 5)

    def run(write, pool):
        def layer(pool, inputs):
            index, layer_rows = inputs
            offset = jnp.where(blocks == DROPPED, 0, index * N_BLOCKS)
            return write(pool, layer_rows, blocks + offset, slots), None

        return jax.lax.scan(layer, pool, (jnp.arange(n_layers), rows))[0]

    expected = run(cache_write.scatter_rows, pool)
    step = jax.jit(partial(run, cache_write.write_rows), donate_argnums=0)
    assert "rz_write_rows" in step.lower(pool).as_text()
    np.testing.assert_array_equal(np.asarray(step(pool)), np.asarray(expected))


def test_rows_of_the_wrong_shape_are_refused():
    variant = cpu_ffi.active()
    pool = jnp.zeros((N_BLOCKS, HEADS, BLOCK, WIDTH), jnp.float32)
    call = jax.ffi.ffi_call(cpu_ffi.write_rows_target(variant), jax.ShapeDtypeStruct(pool.shape, pool.dtype), input_output_aliases={0: 0})
    index = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(Exception, match="rows must be"):
        jax.block_until_ready(call(pool, jnp.zeros((1, 2, HEADS, WIDTH + 1), jnp.float32), index, index))


def test_the_path_is_described():
    assert [row["path"] for row in cache_write.describe_paths("cpu")] == ["cpu_ffi"]
    assert [row["path"] for row in cache_write.describe_paths("cuda")] == ["xla_scatter"]
