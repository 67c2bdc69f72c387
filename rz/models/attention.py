"""Causal self-attention over the KV cache plus the current chunk: masks from absolute positions.

The attention itself is rz_kernels.attention (a kernel per backend and shape); the materialized
`attention_weights` here serve the look-inside API (attention maps).
"""

import jax
import jax.numpy as jnp

import rz_kernels
from rz import kv_cache
from rz.config import ModelConfig
from rz.kv_cache import LayerCache

# Masked scores; finite, so a row with nothing to attend to (a padding query) stays free of NaN.
MASKED = -1e30


def layer_window(cfg: ModelConfig, layer: int) -> int:
    """The sliding window of a layer; 0 for a global layer."""
    return cfg.sliding_window if cfg.sliding_layers[layer] else 0


def attention_mask(query_positions: jax.Array, key_positions: jax.Array, window: int) -> jax.Array:
    """bool [B, T, S]: may the query at position p see the key at position k?

    k must be a real position (>= 0) with k <= p, and on sliding-window layers k > p - window
    (llama.cpp's is_masked_swa).
    """
    p = query_positions[:, :, None]
    k = key_positions[:, None, :]
    visible = (k >= 0) & (k <= p)
    if window:
        visible &= k > p - window
    return visible


def attention_weights(queries: jax.Array, keys: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """softmax(q.k * scale) over visible keys: queries [B, T, H, D], keys [B, n_kv, S, D] -> f32 [B, H, T, S].

    Query head h reads key head h // (H / n_kv), as ggml broadcasts grouped-query attention.
    """
    batch, length, n_head, head_dim = queries.shape
    n_kv = keys.shape[1]
    grouped = queries.reshape(batch, length, n_kv, n_head // n_kv, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", grouped, keys, precision=jax.lax.Precision.HIGHEST) * scale
    scores = jnp.where(mask[:, None, None], scores, MASKED)
    return jax.nn.softmax(scores, axis=-1).reshape(batch, n_head, length, keys.shape[2])


def self_attention(
    cache: LayerCache,
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    positions: jax.Array,
    window: int,
    scale: float,
) -> tuple[jax.Array, LayerCache]:
    """Attend a chunk's queries [B, T, H, D] over the cached history and the chunk's own keys/values
    [B, T, n_kv, D]; then store the chunk in the cache. Returns (f32 [B, T, H * Dv], cache).

    A decode step (T = 1), and any chunk on a global layer, stores its keys first and attends over
    the cache in place: nothing is copied. That is exact: a global layer's slot is its position
    (stale slots hold later positions, hidden by causality), and the only key a ring buffer
    evicts for a single query at p is p - S, outside the window. A longer chunk on a ring buffer
    attends over the history and itself before storing, so that it still sees all of its own
    keys when it is longer than the window.
    """
    batch, length = queries.shape[:2]
    q = queries.transpose(0, 2, 1, 3)
    options = {"window": window, "scale": scale}
    if length == 1 or window == 0:
        cache = kv_cache.write(cache, keys, values, positions)
        out = rz_kernels.attention(
            q, cache.keys, cache.values, positions, cache.positions, keys_in_order=window == 0, **options
        )
    else:
        all_keys = jnp.concatenate([cache.keys, keys.transpose(0, 2, 1, 3).astype(cache.keys.dtype)], axis=2)
        all_values = jnp.concatenate([cache.values, values.transpose(0, 2, 1, 3).astype(cache.values.dtype)], axis=2)
        key_positions = jnp.concatenate([kv_cache.history_positions(cache, positions), positions], axis=1)
        out = rz_kernels.attention(q, all_keys, all_values, positions, key_positions, **options)
        cache = kv_cache.write(cache, keys, values, positions)
    return out.transpose(0, 2, 1, 3).reshape(batch, length, -1), cache
