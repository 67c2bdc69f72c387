"""Causal self-attention over the KV cache plus the current chunk, shared by every family.

A family's block projects its input to queries, keys and values (project_qkv, the one QKV
projection), rotates them (rotate), and attends (self_attention). The attention itself is
rz_kernels.attention (a kernel per backend and shape); its masks, soft cap and softmax are
rz_kernels' too, and so are the attention maps of the look-inside API (rz_kernels.attention_weights).
"""

from dataclasses import replace

import jax

import rz_kernels
from rz import kv_cache
from rz.config import ModelConfig
from rz.kv_cache import LayerView
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
    cache: LayerView,
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    positions: jax.Array,
    scale: float,
    *,
    layer: int,
    cfg: ModelConfig,
) -> tuple[jax.Array, LayerView]:
    """Store a chunk's keys/values [B, T, n_kv, D] in the cache through its block table, then attend
    the chunk's queries [B, T, H, D] over the cache, with the layer's window and the model's
    attention soft cap. Returns (f32 [B, T, H * Dv], cache).

    Writing first is exact: a chunk's positions are contiguous, so every position up to a query's
    holds the sequence's own key once the chunk is written, later (stale) positions are hidden by
    causality, and a sliding layer's ring of blocks holds the window and a whole chunk
    (kv_cache.table_lengths), so the chunk evicts no key a query of it may see.
    """
    batch, length = queries.shape[:2]
    window = layer_window(cfg, layer)
    cache = replace(cache, layer=kv_cache.write(cache, keys, values, positions))
    out = _attend_through_table(queries.transpose(0, 2, 1, 3), cache, positions, window=window, scale=scale,
                                softcap=cfg.attn_logit_softcap)
    return out.transpose(0, 2, 1, 3).reshape(batch, length, -1), cache


def _attend_through_table(q: jax.Array, cache: LayerView, positions: jax.Array, *, window: int, scale: float,
                          softcap: float) -> jax.Array:
    """rz_kernels.attention of q [B, H, T, D] at positions [B, T] over the cache's rows, read in
    place through their block table (a global table's logical slot i holds position i or is empty)."""
    layer = cache.layer
    return rz_kernels.attention(
        q, layer.keys, layer.values, positions, layer.positions, block_table=cache.table,
        window=window, scale=scale, softcap=softcap, keys_in_order=window == 0,
    )
