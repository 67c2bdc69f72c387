"""The KV cache: per layer, the keys and values of past positions, passed into and out of forward.

A layer's buffer has S slots, and position p lives in slot p % S. Global layers get S =
max_seq_len, so the modulo never wraps; sliding-window layers get S = sliding_window, a ring
buffer that keeps exactly the window. Each slot records the absolute position it holds (-1:
empty), and attention masks are built from those positions alone, so the cache needs no write
pointer and a batch row can hold a sequence at any length.

Keys and values are stored as llama.cpp's cache types (rz_kernels.attention_kv: f32, f16, bf16,
q8_0), chosen separately, and the attention kernels read them as stored.
"""

from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp

from rz.config import ModelConfig
from rz.errors import RequestError
from rz_kernels import attention_kv
from rz_kernels.attention_kv import Stored

EMPTY = -1  # the position of an empty slot, and of a padding token


@dataclass(frozen=True)
class CacheTypes:
    """How keys and values are stored: names from rz_kernels.attention_kv.CACHE_TYPES.

    f16 by default, as llama.cpp's; f32 is for exact analysis (benchmarks/kv_cache_types.py
    measures each type against llama.cpp and a float64 reference)."""

    k: str = "f16"
    v: str = "f16"

    def __post_init__(self):
        try:
            attention_kv.check_cache_type(self.k, "cache_type_k")
            attention_kv.check_cache_type(self.v, "cache_type_v")
        except ValueError as error:
            raise RequestError(str(error)) from None


@partial(jax.tree_util.register_dataclass, data_fields=("keys", "values", "positions"), meta_fields=())
@dataclass(frozen=True)
class LayerCache:
    """One layer's keys and values, laid out for attention: heads before slots."""

    keys: Stored  # [B, n_kv_heads, S, head_dim], as CacheTypes.k
    values: Stored  # [B, n_kv_heads, S, head_dim_v], as CacheTypes.v
    positions: jax.Array  # int32 [B, S]: the absolute position in each slot, EMPTY if none

    @property
    def n_slots(self) -> int:
        return self.keys.shape[2]


@partial(jax.tree_util.register_dataclass, data_fields=("layers",), meta_fields=())
@dataclass(frozen=True)
class KVCache:
    layers: tuple[LayerCache, ...]


def init_cache(cfg: ModelConfig, batch_size: int, max_seq_len: int, types: CacheTypes = CacheTypes()) -> KVCache:
    """An empty cache for batch_size sequences of up to max_seq_len positions each."""
    return _empty_cache(cfg, batch_size, max_seq_len, types)


# Compiled once per shape: built op by op, the three arrays per layer cost ~1 ms of dispatch each
# (measured 28 ms for SmolLM2's 30 layers), paid by every prefill before its first token.
@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _empty_cache(cfg: ModelConfig, batch_size: int, max_seq_len: int, types: CacheTypes) -> KVCache:

    def layer(sliding: bool) -> LayerCache:
        n_slots = min(cfg.sliding_window, max_seq_len) if sliding else max_seq_len
        return LayerCache(
            keys=attention_kv.empty(types.k, (batch_size, cfg.n_head_kv, n_slots, cfg.head_dim)),
            values=attention_kv.empty(types.v, (batch_size, cfg.n_head_kv, n_slots, cfg.head_dim_v)),
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

    def scatter(whole: jax.Array, chunk: jax.Array) -> jax.Array:
        return whole.at[rows, :, slots].set(chunk, mode="drop")

    return replace(
        cache,
        keys=jax.tree.map(scatter, cache.keys, attention_kv.like(keys, cache.keys)),
        values=jax.tree.map(scatter, cache.values, attention_kv.like(values, cache.values)),
        positions=cache.positions.at[rows, slots].set(positions, mode="drop"),
    )


def extract_row(cache: KVCache, slot: jax.Array, size: int) -> KVCache:
    """Batch row `slot` of cache as a one-row cache of `size` positions (insert_row's inverse): the
    first min(S, size) slots of each layer, where the positions below `size` live."""

    def layer(whole: LayerCache) -> LayerCache:
        n_slots = min(whole.n_slots, size)

        def row(leaf: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice(leaf, (slot, 0, 0, 0), (1, leaf.shape[1], n_slots, leaf.shape[3]))

        return LayerCache(
            keys=jax.tree.map(row, whole.keys),
            values=jax.tree.map(row, whole.values),
            positions=jax.lax.dynamic_slice(whole.positions, (slot, 0), (1, n_slots)),
        )

    return KVCache(tuple(layer(whole) for whole in cache.layers))


def insert_row(cache: KVCache, row: KVCache, slot: jax.Array) -> KVCache:
    """cache with batch row `slot` replaced by the one-row cache `row`, which may hold fewer slots
    per layer (a prompt prefilled into a cache of its own size): its slots go first, and the row's
    other slots become empty. Position p sits in slot p % S in both, since a row cache with fewer
    slots than the whole never holds a position past its size."""

    def layer(whole: LayerCache, part: LayerCache) -> LayerCache:
        positions = jax.lax.dynamic_update_slice(
            whole.positions, jnp.full((1, whole.n_slots), EMPTY, jnp.int32), (slot, 0)
        )

        def put(whole_leaf: jax.Array, part_leaf: jax.Array) -> jax.Array:
            return jax.lax.dynamic_update_slice(whole_leaf, part_leaf, (slot, 0, 0, 0))

        return LayerCache(
            keys=jax.tree.map(put, whole.keys, part.keys),
            values=jax.tree.map(put, whole.values, part.values),
            positions=jax.lax.dynamic_update_slice(positions, part.positions, (slot, 0)),
        )

    return KVCache(tuple(layer(whole, part) for whole, part in zip(cache.layers, row.layers)))
