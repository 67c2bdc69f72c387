"""Causal self-attention over the KV cache plus the current chunk, shared by every family.

A family's block projects its input to queries, keys and values (project_qkv, the one QKV
projection), rotates them (rotate), and attends (self_attention). The attention itself is
rz_kernels.attention (a kernel per backend and shape); its masks, soft cap and softmax are
rz_kernels' too, and so are the attention maps of the look-inside API (rz_kernels.attention_weights).
"""

import jax
import jax.numpy as jnp

import rz_kernels
from rz_kernels import attention_kv
from rz_kernels.attention_kv import Stored
from rz import kv_cache
from rz.config import ModelConfig
from rz.kv_cache import LayerCache
from rz.models.layers import Rope, RopeTable, apply_rope, linear_many, rms_norm
from rz.weights import AttentionProjections


def layer_window(cfg: ModelConfig, layer: int) -> int:
    """The sliding window of a layer; 0 for a global layer."""
    return cfg.sliding_window if cfg.sliding_layers[layer] else 0


def project_qkv(w: AttentionProjections, h: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A block's normed input h [B, T, n_embd] through its q/k/v projections
    -> queries [B, T, H, D], keys [B, T, n_kv, D], values [B, T, n_kv, Dv]."""
    batch, length, _ = h.shape
    queries, keys, values = linear_many(h, (w.wq, w.wk, w.wv), (w.bq, w.bk, w.bv))
    return (
        queries.reshape(batch, length, cfg.n_head, cfg.head_dim),
        keys.reshape(batch, length, cfg.n_head_kv, cfg.head_dim),
        values.reshape(batch, length, cfg.n_head_kv, cfg.head_dim_v),
    )


def normalize_heads(
    queries: jax.Array, keys: jax.Array, q_norm: jax.Array | None, k_norm: jax.Array | None, cfg: ModelConfig
) -> tuple[jax.Array, jax.Array]:
    """Each query and key head RMS-normalized (QK-norm: Gemma 3, Qwen3), or as they are where the
    family has no such norm (None). Summed in a fixed order, so that a head's result does not
    depend on how many heads a tensor-parallel shard holds (rms_norm's fixed_order)."""
    if q_norm is None:
        return queries, keys
    return (
        rms_norm(queries, q_norm, cfg.norm_eps, fixed_order=True),
        rms_norm(keys, k_norm, cfg.norm_eps, fixed_order=True),
    )


def rotate(queries: jax.Array, keys: jax.Array, rope_table: RopeTable, layer: int, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """Queries and keys with the RoPE of the layer's kind (sliding or global) applied, or as
    they are on a layer without RoPE (SmolLM3's every fourth)."""
    if not cfg.rope_layers[layer]:
        return queries, keys
    rope = Rope.for_layer(cfg, cfg.sliding_layers[layer])
    return apply_rope(queries, rope_table, rope), apply_rope(keys, rope_table, rope)


def self_attention(
    cache: LayerCache,
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    positions: jax.Array,
    scale: float,
    *,
    layer: int,
    cfg: ModelConfig,
) -> tuple[jax.Array, LayerCache]:
    """Attend a chunk's queries [B, T, H, D] over the cached history and the chunk's own keys/values
    [B, T, n_kv, D], with the layer's window and the model's attention soft cap; then store the
    chunk in the cache. Returns (f32 [B, T, H * Dv], cache).

    A decode step (T = 1), and any chunk on a global layer, stores its keys first and attends over
    the cache in place: nothing is copied. That is exact: a global layer's slot is its position
    (stale slots hold later positions, hidden by causality), and the only key a ring buffer
    evicts for a single query at p is p - S, outside the window. A longer chunk on a ring buffer
    attends over the history and itself before storing, so that it still sees all of its own
    keys when it is longer than the window.
    """
    batch, length = queries.shape[:2]
    window = layer_window(cfg, layer)
    q = queries.transpose(0, 2, 1, 3)
    options = {"window": window, "scale": scale, "softcap": cfg.attn_logit_softcap}
    if length == 1 or window == 0:
        cache = kv_cache.write(cache, keys, values, positions)
        out = rz_kernels.attention(
            q, cache.keys, cache.values, positions, cache.positions, keys_in_order=window == 0, **options
        )
    else:
        # The chunk's rows are the cache's first (a verify step runs on a batch bucket of them).
        history = jax.tree.map(lambda leaf: leaf[:batch], cache)
        all_keys = _with_chunk(history.keys, keys)
        all_values = _with_chunk(history.values, values)
        key_positions = jnp.concatenate([kv_cache.history_positions(history, positions), positions], axis=1)
        out = rz_kernels.attention(q, all_keys, all_values, positions, key_positions, **options)
        cache = kv_cache.write(cache, keys, values, positions)
    return out.transpose(0, 2, 1, 3).reshape(batch, length, -1), cache


def _with_chunk(stored: Stored, chunk: jax.Array) -> Stored:
    """The cache's keys or values [B, n_kv, S, D] followed by a chunk's [B, T, n_kv, D], stored alike."""
    chunk = attention_kv.like(chunk.transpose(0, 2, 1, 3), stored)
    return jax.tree.map(lambda cached, new: jnp.concatenate([cached, new], axis=2), stored, chunk)
