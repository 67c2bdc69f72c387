"""The key/value storage the attention kernels read directly: llama.cpp's KV cache types.

    f32, f16, bf16   a plain array [..., S, D] of that dtype
    q8_0             Q8_0Rows: int8 quants [..., S, D] and one f16 scale per 32 of a row's
                     elements [..., S, D / 32] (llama.cpp's block_q8_0, split into two arrays so
                     that both keep the slot axis where a float array has it)

Every leaf of a stored tensor has its slot axis second from the end, so the cache slices and
scatters slots with one jax.tree.map whatever the type.

Two layouts hold a cache's K and V: a slab [B, Hkv, S, D] (row b is sequence b), or a paged pool
[N, Hkv, block_size, D] whose blocks a block table maps to sequences (paged_as_slab says how).
"""

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from rz_kernels import zero_pages

CACHE_TYPES = ("f32", "f16", "bf16", "q8_0")
Q8_0_BLOCK = 32  # elements per f16 scale, as ggml's QK8_0
_FLOAT_DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}


@partial(jax.tree_util.register_dataclass, data_fields=("quants", "scales"), meta_fields=())
@dataclass(frozen=True)
class Q8_0Rows:
    """Rows stored as llama.cpp's q8_0: x[..., i] = quants[..., i] * scales[..., i // 32]."""

    quants: jax.Array  # int8 [..., S, D]
    scales: jax.Array  # f16 [..., S, D / 32]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.quants.shape


Stored = jax.Array | Q8_0Rows


def check_cache_type(name: str, what: str = "cache type") -> str:
    """name if it is one of CACHE_TYPES; otherwise a ValueError listing them."""
    if name not in CACHE_TYPES:
        raise ValueError(f"unknown {what} {name!r}: use one of {', '.join(CACHE_TYPES)} (llama.cpp's names)")
    return name


def cache_type_of(stored: Stored) -> str:
    """The CACHE_TYPES name of a stored tensor."""
    if isinstance(stored, Q8_0Rows):
        return "q8_0"
    return next(name for name, dtype in _FLOAT_DTYPES.items() if stored.dtype == dtype)


def empty(cache_type: str, shape: tuple[int, ...]) -> Stored:
    """Zeros of `shape` ([..., S, D]) stored as cache_type, resident only where written (rz_kernels.zero_pages)."""
    check_cache_type(cache_type)
    if cache_type != "q8_0":
        return zero_pages.zeros(shape, _FLOAT_DTYPES[cache_type])
    _check_q8_0_width(shape[-1])
    return Q8_0Rows(zero_pages.zeros(shape, jnp.int8), zero_pages.zeros((*shape[:-1], shape[-1] // Q8_0_BLOCK), jnp.float16))


def store(x: jax.Array, cache_type: str) -> Stored:
    """x [..., D] (f32) converted to cache_type. q8_0 rounds as ggml's quantize_row_q8_0 on x86:
    scale max|x| / 127, quants round-half-even(x * 127 / max|x|)."""
    if cache_type != "q8_0":
        return x.astype(_FLOAT_DTYPES[check_cache_type(cache_type)])
    _check_q8_0_width(x.shape[-1])
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // Q8_0_BLOCK, Q8_0_BLOCK)
    peak = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    inverse = jnp.where(peak > 0, 127.0 / jnp.where(peak > 0, peak, 1.0), 0.0)
    quants = jnp.round(blocks * inverse).astype(jnp.int8).reshape(x.shape)
    return Q8_0Rows(quants, (peak[..., 0] / 127.0).astype(jnp.float16))


def like(x: jax.Array, stored: Stored) -> Stored:
    """x [..., D] converted to the type of `stored`."""
    return store(x, cache_type_of(stored))


def to_f32(stored: Stored) -> jax.Array:
    """The values of a stored tensor as f32 [..., S, D] (for the XLA paths, which fuse it into their dots)."""
    if not isinstance(stored, Q8_0Rows):
        return stored.astype(jnp.float32)
    quants = stored.quants.astype(jnp.float32)
    blocks = quants.reshape(*quants.shape[:-1], quants.shape[-1] // Q8_0_BLOCK, Q8_0_BLOCK)
    return (blocks * stored.scales.astype(jnp.float32)[..., None]).reshape(quants.shape)


def paged_as_slab(k_pool: Stored, v_pool: Stored, pool_positions: jax.Array, block_table: jax.Array) -> tuple[Stored, Stored, jax.Array]:
    """The slots a block table maps, gathered into the slab layout (for the XLA paths and as the
    paged kernels' reference).

        k_pool, v_pool   [N, Hkv, block_size, D or Dv], any cache type
        pool_positions   int32 [N, block_size]: the position each pool slot holds, -1: empty
        block_table      int32 [B, n_table]: sequence b's slot i lives in pool block
                         block_table[b, i // block_size] at i % block_size; -1: absent
        -> k, v [B, Hkv, n_table * block_size, D or Dv] and positions int32 [B, n_table * block_size],
           an absent entry's slots empty (position -1, K and V zero)
    """
    present = block_table >= 0
    blocks = jnp.where(present, block_table, 0)
    batch, n_table = block_table.shape

    def gather(leaf):
        taken = jnp.where(present[:, :, None, None, None], leaf[blocks], jnp.zeros((), leaf.dtype))
        _, _, n_kv, block_size, width = taken.shape
        return taken.transpose(0, 2, 1, 3, 4).reshape(batch, n_kv, n_table * block_size, width)

    positions = jnp.where(present[:, :, None], pool_positions[blocks], -1).reshape(batch, -1)
    return jax.tree.map(gather, k_pool), jax.tree.map(gather, v_pool), positions.astype(jnp.int32)


def _check_q8_0_width(width: int) -> None:
    if width % Q8_0_BLOCK:
        raise ValueError(f"a q8_0 cache needs head dims that are multiples of {Q8_0_BLOCK}, got {width}: use f16 or bf16")
