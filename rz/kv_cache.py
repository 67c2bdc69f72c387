"""The KV cache: for each kind of layer (global, sliding), one pool of blocks of keys and values
holding every layer of that kind, read and written through block tables.

A layer's keys and values are N blocks of `block_size` slots each; the layers of a kind lie one
after another in their kind's pool, the i-th layer of the kind at blocks i * N .. (i + 1) * N - 1,
so that a compiled step can run its layers as one loop over a layer index (rz.models.forward) and
reach layer i's blocks through its table plus i * N, with nothing copied. Each batch row has a
block table per kind: position p of row b lives in block tables[kind][b, (p // block_size) %
table_length] of each layer's N, slot p % block_size. A global layer's table covers the context,
so it never wraps; a sliding-window layer's is a ring of blocks just longer than the window plus
the longest chunk written at once (table_lengths), so that a chunk is written first and then
attended over with its whole window still in place, and sliding layers hold about their window,
not the context. Each slot records the absolute position it holds (-1: empty), and attention masks
are built from those positions alone, so the cache needs no write pointer and a row can hold a
sequence at any length.

Tables are plain data: an allocator (rz.kv_blocks, in the engine; init_cache's identity tables,
row r owning blocks r * table_length onward, elsewhere) decides which blocks a row reads and
writes; table entries of -1 are absent, never read and never written.

Keys and values are stored as llama.cpp's cache types (rz_kernels.attention_kv: f32, f16, bf16,
q8_0), chosen separately, and the attention kernels read them as stored.
"""

from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp

from rz.config import ModelConfig
from rz.errors import RequestError
from rz_kernels import attention_kv, cache_write
from rz_kernels.attention_kv import Stored

EMPTY = -1  # the position of an empty slot, and of a padding token; an absent table entry
# The block a dropped write goes to: beyond any pool (scatters drop it), and still beyond after a
# layer's offset into its kind's pool is added (WriteSlots.of_layer).
DROPPED = 1 << 30
BLOCK_SIZE = 64  # slots per block (benchmarks/results/paged-attention-session16.md)


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
    """A pool of blocks, laid out for attention: heads before slots (a kind's layers one after another, KVCache)."""

    keys: Stored  # [N_blocks, n_kv_heads, block_size, head_dim], as CacheTypes.k
    values: Stored  # [N_blocks, n_kv_heads, block_size, head_dim_v], as CacheTypes.v
    positions: jax.Array  # int32 [N_blocks, block_size]: the absolute position in each slot, EMPTY if none

    @property
    def block_size(self) -> int:
        return self.positions.shape[1]


@partial(jax.tree_util.register_dataclass, data_fields=("blocks", "slots", "started"), meta_fields=())
@dataclass(frozen=True)
class WriteSlots:
    """Where a chunk's positions [B, T] land in one layer's blocks (write_slots): the same for every
    layer of a kind up to the layer's offset in the pool, so a step computes them once per kind,
    not once per layer. DROPPED stands for "not written"."""

    blocks: jax.Array  # int32 [B, T]: the block of each position
    slots: jax.Array  # int32 [B, T]: its slot in the block
    started: jax.Array  # int32 [B, T]: the block again where the position is its first slot, to clear

    def of_layer(self, first_block: jax.Array | int) -> "WriteSlots":
        """These writes in the layer whose blocks start at first_block of the pool."""
        return WriteSlots(self.blocks + first_block, self.slots, self.started + first_block)


@partial(jax.tree_util.register_dataclass, data_fields=("layer", "table", "writes"), meta_fields=())
@dataclass(frozen=True)
class LayerView:
    """What one layer's attention reads and writes: its kind's pool, the layer's block table for
    the rows of the chunk, int32 [B, table_length] (its kind's, offset to the layer's blocks), and
    where the chunk's positions go in it (None: write computes them)."""

    layer: LayerCache
    table: jax.Array
    writes: WriteSlots | None = None


@partial(jax.tree_util.register_dataclass, data_fields=("pools", "tables"), meta_fields=("kinds", "layer_blocks"))
@dataclass(frozen=True)
class KVCache:
    """Each kind's pool of every layer of that kind (pools[sliding]; a kind without layers has
    none), and the block tables of the rows that run on it: tables[sliding], the global layers'
    int32 [B, global length] first, then the sliding layers' [B, sliding length] (length 0 for a
    model without them). A step for fewer rows than the tables have uses the first.

    kinds: the kind of each layer the cache serves (ModelConfig.sliding_layers, or its first layers');
    layer_blocks: the blocks each layer of a kind has in its pool (global, sliding)."""

    pools: tuple[LayerCache, LayerCache]
    tables: tuple[jax.Array, jax.Array]
    kinds: tuple[bool, ...]
    layer_blocks: tuple[int, int]

    def first_block(self, layer: int) -> int:
        """Where layer `layer`'s blocks start in its kind's pool."""
        sliding = self.kinds[layer]
        return self.kinds[:layer].count(sliding) * self.layer_blocks[sliding]

    def view(self, layer: int, n_rows: int, writes: WriteSlots | None = None) -> LayerView:
        """Layer `layer` with its kind's table for the first n_rows rows, and where a chunk goes in it
        (write_slots of its kind's table, which the caller may have computed)."""
        sliding = self.kinds[layer]
        return layer_view(self.pools[sliding], self.tables[sliding][:n_rows], self.first_block(layer), writes)

    def layer(self, layer: int) -> LayerCache:
        """Layer `layer`'s blocks, a copy (for tests and analysis: steps read the pools in place)."""
        start, count = self.first_block(layer), self.layer_blocks[self.kinds[layer]]
        return jax.tree.map(lambda leaf: leaf[start : start + count], self.pools[self.kinds[layer]])

    def with_tables(self, tables: tuple[jax.Array, jax.Array]) -> "KVCache":
        """The same pools read through other tables (a prefill runs on its row's tables alone)."""
        return replace(self, tables=tuple(tables))

    def first_layers(self, n_layers: int) -> "KVCache":
        """The cache as its first n_layers layers see it (the `self` proposer drafts in them): the
        same pools, the later layers' blocks untouched by a step that runs only the first."""
        return replace(self, kinds=self.kinds[:n_layers])

    def with_first_layers(self, part: "KVCache") -> "KVCache":
        """first_layers' inverse: part's pools and tables (a step that took part donated them) for all of this cache's layers."""
        return replace(part, kinds=self.kinds)


def layer_view(pool: LayerCache, table: jax.Array, first_block: jax.Array | int, writes: WriteSlots | None) -> LayerView:
    """The view of the layer whose blocks start at first_block of its kind's pool (an index traced
    in a loop over layers, or known): its kind's table, offset there (absent entries stay absent),
    and its kind's writes (write_slots of that table), offset too."""
    return LayerView(pool, jnp.where(table >= 0, table + first_block, EMPTY), None if writes is None else writes.of_layer(first_block))


def table_lengths(cfg: ModelConfig, n_ctx: int, block_size: int, max_write: int) -> tuple[int, int]:
    """Blocks per table of each kind (global, sliding), for a context of n_ctx positions and chunks
    of at most max_write tokens.

    A global table covers the context. A sliding ring holds the window and the chunk being
    written, and one block more, since a chunk may start mid-block: every key a query of the chunk
    may see is still there after the chunk is written (the ring is never wider than the context's).
    """
    global_length = -(-n_ctx // block_size)
    if not any(cfg.sliding_layers):
        return global_length, 0
    ring = -(-(cfg.sliding_window + max_write) // block_size) + 1
    return global_length, min(ring, global_length)


def ring(cfg: ModelConfig, n_ctx: int, block_size: int, max_write: int) -> tuple[int, int]:
    """A row's sliding-layer ring as (slots, reach); (0, 0) for a model without sliding layers.

    To write a chunk from position n on, a ring must still hold the keys at n - window .. n - 1. A
    row that has written no position past max(slots, n + reach) does: a write at w evicts the
    position w - slots and, at a block's first slot, clears the rest of that block's previous lap.
    """
    _, length = table_lengths(cfg, n_ctx, block_size, max_write)
    slots = length * block_size
    return (slots, slots - block_size - cfg.sliding_window) if length else (0, 0)


def identity_tables(n_rows: int, lengths: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Tables giving row r the blocks r * length .. (r + 1) * length - 1 of each kind's pool."""
    return tuple(jnp.arange(n_rows * length, dtype=jnp.int32).reshape(n_rows, length) for length in lengths)


def init_cache(
    cfg: ModelConfig,
    n_rows: int,
    n_ctx: int,
    types: CacheTypes = CacheTypes(),
    *,
    block_size: int = BLOCK_SIZE,
    max_write: int | None = None,
    n_blocks: tuple[int, int] | None = None,
) -> KVCache:
    """An empty cache for n_rows sequences of up to n_ctx positions each, with identity tables; or,
    given n_blocks (per kind, global then sliding: an allocator's blocks), pools of that many blocks
    per layer and tables of n_rows rows with no block in them.

    max_write: the longest chunk written at once (by default n_ctx: any chunk)."""
    return _empty_cache(cfg, n_rows, n_ctx, types, block_size, n_ctx if max_write is None else max_write, n_blocks)


# Compiled once per shape: built op by op, the three arrays per layer cost ~1 ms of dispatch each
# (measured 28 ms for SmolLM2's 30 layers), paid by every prefill before its first token.
@partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _empty_cache(
    cfg: ModelConfig, n_rows: int, n_ctx: int, types: CacheTypes, block_size: int, max_write: int, n_blocks: tuple[int, int] | None
) -> KVCache:
    lengths = table_lengths(cfg, n_ctx, block_size, max_write)
    if n_blocks is None:
        n_blocks, tables = tuple(n_rows * length for length in lengths), identity_tables(n_rows, lengths)
    else:
        tables = tuple(jnp.full((n_rows, length), EMPTY, jnp.int32) for length in lengths)

    def pool(sliding: bool) -> LayerCache:
        blocks = n_blocks[sliding] * cfg.sliding_layers.count(sliding)
        return LayerCache(
            keys=attention_kv.empty(types.k, (blocks, cfg.n_head_kv, block_size, cfg.head_dim)),
            values=attention_kv.empty(types.v, (blocks, cfg.n_head_kv, block_size, cfg.head_dim_v)),
            positions=jnp.full((blocks, block_size), EMPTY, jnp.int32),
        )

    return KVCache((pool(False), pool(True)), tables, tuple(cfg.sliding_layers), tuple(n_blocks))


def write_slots(table: jax.Array, positions: jax.Array, block_size: int) -> WriteSlots:
    """Where positions [B, T] go through a table int32 [B, length] into a pool of blocks of
    block_size slots (see write). Padding (position -1) and absent table entries are dropped
    (block DROPPED). When
    a chunk is longer than a ring, only its last positions that fit are kept: the earlier ones
    would share their slots, and a scatter with duplicate indices has no defined winner."""
    length = table.shape[1]
    last = jnp.max(positions, axis=1, keepdims=True)
    kept = (positions >= 0) & (positions > last - length * block_size)
    logical = jnp.where(kept, (positions // block_size) % max(length, 1), 0)
    blocks = jnp.take_along_axis(table, logical, axis=1)
    blocks = jnp.where(kept & (blocks >= 0), blocks, DROPPED)
    slots = jnp.maximum(positions, 0) % block_size
    return WriteSlots(blocks, slots, jnp.where(slots == 0, blocks, DROPPED))


def write(view: LayerView, keys: jax.Array, values: jax.Array, positions: jax.Array) -> LayerCache:
    """Store a chunk's keys [B, T, n_kv, D] and values at their positions [B, T] through the view's
    table (at view.writes, or write_slots computed here); padding and absent table entries are
    dropped. Returns the pool.

    A block whose first slot the chunk writes has its other slots' positions cleared first: what
    they held (a ring's previous lap, a reused row's or block's previous sequence) is stale, and
    the slots the chunk writes after the first are written after the clearing. A chunk starting
    mid-block clears nothing: the block's earlier slots are its sequence's history, written with
    the block's first slot.
    """
    layer = view.layer
    writes = view.writes if view.writes is not None else write_slots(view.table, positions, layer.block_size)
    blocks, slots = writes.blocks, writes.slots

    def write_leaf(whole: jax.Array, chunk: jax.Array) -> jax.Array:
        return cache_write.write_rows(whole, chunk, blocks, slots)

    return LayerCache(
        keys=jax.tree.map(write_leaf, layer.keys, attention_kv.like(keys, layer.keys)),
        values=jax.tree.map(write_leaf, layer.values, attention_kv.like(values, layer.values)),
        positions=cache_write.write_positions(layer.positions, positions, blocks, slots, writes.started, EMPTY),
    )


def through_table(view: LayerView) -> tuple[Stored, Stored, jax.Array]:
    """The view's rows as contiguous keys, values [B, n_kv, table_length * block_size, D] and
    positions [B, table_length * block_size], logical slot i holding what the table puts there
    (absent entries: EMPTY positions). A copy, for tests and analysis: attention reads the pool in place."""
    return attention_kv.paged_as_slab(view.layer.keys, view.layer.values, view.layer.positions, view.table)


def copy_blocks(cache: KVCache, sources: tuple[jax.Array, jax.Array], destinations: tuple[jax.Array, jax.Array]) -> KVCache:
    """cache with blocks destinations[sliding] int32 [n] of every layer of that kind set to what
    that layer's blocks sources[sliding] hold; a destination of -1 gets nothing."""

    def pool(sliding: bool) -> LayerCache:
        first_blocks = jnp.arange(cache.kinds.count(sliding), dtype=jnp.int32)[:, None] * cache.layer_blocks[sliding]
        source = (jnp.maximum(sources[sliding], 0) + first_blocks).reshape(-1)
        destination = jnp.where(destinations[sliding] >= 0, destinations[sliding] + first_blocks, DROPPED).reshape(-1)
        return jax.tree.map(lambda leaf: leaf.at[destination].set(leaf[source], mode="drop"), cache.pools[sliding])

    return replace(cache, pools=(pool(False), pool(True)))
