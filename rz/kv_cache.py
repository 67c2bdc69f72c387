"""The KV cache: per layer, the keys and values of past positions, passed into and out of forward.

A layer's buffer has S slots, and position p lives in slot p % S. Global layers get S =
max_seq_len, so the modulo never wraps; sliding-window layers get S = sliding_window, a ring
buffer that keeps exactly the window. Each slot records the absolute position it holds (-1:
empty), and attention masks are built from those positions alone, so the cache needs no write
pointer and a batch row can hold a sequence at any length.
"""

from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp

from rz.config import ModelConfig

EMPTY = -1  # the position of an empty slot, and of a padding token
# K/V are kept in f32. llama.cpp's default is f16 (half the memory and bandwidth), and rz's kernels
# read either; with f16, rz's distance to a float64 reference rose above llama.cpp's, and rz keeps
# the bound of staying below it (benchmarks/results/design-measurements.md).
CACHE_DTYPE = jnp.float32


@partial(jax.tree_util.register_dataclass, data_fields=("keys", "values", "positions"), meta_fields=())
@dataclass(frozen=True)
class LayerCache:
    """One layer's keys and values, laid out for attention: heads before slots."""

    keys: jax.Array  # CACHE_DTYPE [B, n_kv_heads, S, head_dim]
    values: jax.Array  # CACHE_DTYPE [B, n_kv_heads, S, head_dim_v]
    positions: jax.Array  # int32 [B, S]: the absolute position in each slot, EMPTY if none

    @property
    def n_slots(self) -> int:
        return self.keys.shape[2]


@partial(jax.tree_util.register_dataclass, data_fields=("layers",), meta_fields=())
@dataclass(frozen=True)
class KVCache:
    layers: tuple[LayerCache, ...]


def init_cache(cfg: ModelConfig, batch_size: int, max_seq_len: int) -> KVCache:
    """An empty cache for batch_size sequences of up to max_seq_len positions each."""
    return _empty_cache(cfg, batch_size, max_seq_len)


# Compiled once per shape: built op by op, the three arrays per layer cost ~1 ms of dispatch each
# (measured 28 ms for SmolLM2's 30 layers), paid by every prefill before its first token.
@partial(jax.jit, static_argnums=(0, 1, 2))
def _empty_cache(cfg: ModelConfig, batch_size: int, max_seq_len: int) -> KVCache:

    def layer(sliding: bool) -> LayerCache:
        n_slots = min(cfg.sliding_window, max_seq_len) if sliding else max_seq_len
        return LayerCache(
            keys=jnp.zeros((batch_size, cfg.n_head_kv, n_slots, cfg.head_dim), CACHE_DTYPE),
            values=jnp.zeros((batch_size, cfg.n_head_kv, n_slots, cfg.head_dim_v), CACHE_DTYPE),
            positions=jnp.full((batch_size, n_slots), EMPTY, jnp.int32),
        )

    return KVCache(tuple(layer(sliding) for sliding in cfg.sliding_layers))


def history_positions(cache: LayerCache, positions: jax.Array) -> jax.Array:
    """The positions of the cached keys a chunk may attend to [B, S]; EMPTY where it may not.

    The cache is the history before the chunk: a slot holding a position at or after the chunk's
    first position is stale (a reused batch row, or a sequence rewound), so it is hidden.
    """
    first = jnp.min(jnp.where(positions >= 0, positions, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
    return jnp.where(cache.positions < first, cache.positions, EMPTY)


def write(cache: LayerCache, keys: jax.Array, values: jax.Array, positions: jax.Array) -> LayerCache:
    """Store a chunk's keys [B, T, n_kv, D] and values at their positions [B, T]; padding is dropped.

    When the chunk is longer than a ring buffer, only its last S positions are stored: the
    earlier ones would share their slots, and a scatter with duplicate indices has no defined winner.
    """
    n_slots = cache.n_slots
    last = jnp.max(positions, axis=1, keepdims=True)
    kept = (positions >= 0) & (positions > last - n_slots)
    slots = jnp.where(kept, positions % n_slots, n_slots)  # n_slots is out of range: dropped
    rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
    return replace(
        cache,
        keys=cache.keys.at[rows, :, slots].set(keys.astype(cache.keys.dtype), mode="drop"),
        values=cache.values.at[rows, :, slots].set(values.astype(cache.values.dtype), mode="drop"),
        positions=cache.positions.at[rows, slots].set(positions, mode="drop"),
    )


def extract_row(cache: KVCache, slot: jax.Array, size: int) -> KVCache:
    """Batch row `slot` of cache as a one-row cache of `size` positions (insert_row's inverse): the
    first min(S, size) slots of each layer, where the positions below `size` live."""

    def layer(whole: LayerCache) -> LayerCache:
        n_slots = min(whole.n_slots, size)
        return LayerCache(
            keys=jax.lax.dynamic_slice(whole.keys, (slot, 0, 0, 0), (1, whole.keys.shape[1], n_slots, whole.keys.shape[3])),
            values=jax.lax.dynamic_slice(
                whole.values, (slot, 0, 0, 0), (1, whole.values.shape[1], n_slots, whole.values.shape[3])
            ),
            positions=jax.lax.dynamic_slice(whole.positions, (slot, 0), (1, n_slots)),
        )

    return KVCache(tuple(layer(whole) for whole in cache.layers))


def insert_row(cache: KVCache, row: KVCache, slot: jax.Array) -> KVCache:
    """cache with batch row `slot` replaced by the one-row cache `row`, which may hold fewer slots
    per layer (a prompt prefilled into a cache of its own size): its slots go first, and the row's
    other slots become empty. Position p sits in slot p % S in both, since a row cache with fewer
    slots than the whole never holds a position past its size."""

    def layer(whole: LayerCache, part: LayerCache) -> LayerCache:
        at = (slot, 0, 0, 0)
        positions = jax.lax.dynamic_update_slice(
            whole.positions, jnp.full((1, whole.n_slots), EMPTY, jnp.int32), (slot, 0)
        )
        return LayerCache(
            keys=jax.lax.dynamic_update_slice(whole.keys, part.keys.astype(whole.keys.dtype), at),
            values=jax.lax.dynamic_update_slice(whole.values, part.values.astype(whole.values.dtype), at),
            positions=jax.lax.dynamic_update_slice(positions, part.positions, (slot, 0)),
        )

    return KVCache(tuple(layer(whole, part) for whole, part in zip(cache.layers, row.layers)))
