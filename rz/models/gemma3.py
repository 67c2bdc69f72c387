"""Gemma 3: sliding-window layers interleaved with global ones, each with its own RoPE base.

Blocks normalize before and after both attention and the GeGLU MLP, and normalize each query
and key head (QK-norm); embeddings are scaled by sqrt(n_embd) (llama.cpp's gemma3 graph builder).
Gemma 2 is this graph without QK-norm (gemma2.py); its soft caps and sliding layers come from
its config.
"""

import math
from dataclasses import dataclass

import jax

from rz.config import ModelConfig
from rz.kv_cache import LayerView
from rz.models import attention
from rz.models.family import Family
from rz.models.layers import RopeTable, no_rope_freq_factors, embed as embed_rows, geglu, linear, linear_many, rms_norm, softcap
from rz.weights import AttentionProjections, Either, attention_projections, matrix, vector
from rz_kernels.quants import QTensor

# The 27B models (Gemma 2's 46 layers, Gemma 3's 62) scale queries by the model width per head
# rather than by head_dim (llama.cpp's f_attention_scale).
WIDTH_SCALED_QUERY_LAYERS = {"gemma2": 46, "gemma3": 62}


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerWeights:
    attn_norm: jax.Array
    qkv: AttentionProjections
    q_norm: jax.Array | None  # None in Gemma 2, which has no QK-norm
    k_norm: jax.Array | None
    wo: QTensor
    post_attn_norm: jax.Array
    ffn_norm: jax.Array
    w_gate: QTensor
    w_up: QTensor
    w_down: QTensor
    post_ffn_norm: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Weights:
    token_embd: QTensor
    layers: tuple[LayerWeights, ...]
    output_norm: jax.Array
    output: QTensor  # the token embedding itself when the model ties them


def tensor_specs(cfg: ModelConfig) -> Weights:
    n_embd, n_ff, n_vocab = cfg.n_embd, cfg.n_ff, cfg.n_vocab

    def layer(i: int) -> LayerWeights:
        blk = f"blk.{i}"
        return LayerWeights(
            attn_norm=vector(f"{blk}.attn_norm.weight", n_embd),
            qkv=attention_projections(i, cfg),
            q_norm=vector(f"{blk}.attn_q_norm.weight", cfg.head_dim),
            k_norm=vector(f"{blk}.attn_k_norm.weight", cfg.head_dim),
            wo=matrix(f"{blk}.attn_output.weight", n_embd, cfg.n_head * cfg.head_dim_v),
            post_attn_norm=vector(f"{blk}.post_attention_norm.weight", n_embd),
            ffn_norm=vector(f"{blk}.ffn_norm.weight", n_embd),
            w_gate=matrix(f"{blk}.ffn_gate.weight", n_ff, n_embd),
            w_up=matrix(f"{blk}.ffn_up.weight", n_ff, n_embd),
            w_down=matrix(f"{blk}.ffn_down.weight", n_embd, n_ff),
            post_ffn_norm=vector(f"{blk}.post_ffw_norm.weight", n_embd),
        )

    return Weights(
        token_embd=matrix("token_embd.weight", n_vocab, n_embd),
        layers=tuple(layer(i) for i in range(cfg.n_layer)),
        output_norm=vector("output_norm.weight", n_embd),
        output=Either((matrix("output.weight", n_vocab, n_embd), matrix("token_embd.weight", n_vocab, n_embd))),
    )


def embed(weights: Weights, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    return embed_rows(weights.token_embd, tokens) * math.sqrt(cfg.n_embd)


def query_scale(cfg: ModelConfig) -> float:
    if cfg.n_layer == WIDTH_SCALED_QUERY_LAYERS[cfg.architecture]:
        return (cfg.n_embd / cfg.n_head) ** -0.5
    return cfg.head_dim**-0.5


rope_freq_factors = no_rope_freq_factors


def attention_inputs(w: LayerWeights, x: jax.Array, rope_table: RopeTable, layer: int, cfg: ModelConfig):
    queries, keys, values = attention.project_qkv(w.qkv, rms_norm(x, w.attn_norm, cfg.norm_eps), cfg)
    queries, keys = attention.normalize_heads(queries, keys, w.q_norm, w.k_norm, cfg)
    queries, keys = attention.rotate(queries, keys, rope_table, layer, cfg)
    return queries * query_scale(cfg), keys, values, 1.0


def block(
    w: LayerWeights, cache: LayerView, x: jax.Array, positions: jax.Array, rope_table: RopeTable, layer: int, cfg: ModelConfig
):
    with jax.named_scope("attention"):
        queries, keys, values, scale = attention_inputs(w, x, rope_table, layer, cfg)
        out, cache = attention.self_attention(cache, queries, keys, values, positions, scale, layer=layer, cfg=cfg)
        x = x + rms_norm(linear(out, w.wo), w.post_attn_norm, cfg.norm_eps)
    with jax.named_scope("mlp"):
        h = rms_norm(x, w.ffn_norm, cfg.norm_eps)
        gate, up = linear_many(h, (w.w_gate, w.w_up), (None, None))
        mlp_out = linear(geglu(gate, up), w.w_down)
        x = x + rms_norm(mlp_out, w.post_ffn_norm, cfg.norm_eps)
    return x, cache


def final_norm(weights: Weights, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    return rms_norm(x, weights.output_norm, cfg.norm_eps)


def lm_head(weights: Weights, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    logits = linear(hidden, weights.output)
    return softcap(logits, cfg.final_logit_softcap) if cfg.final_logit_softcap else logits


FAMILY = Family(tensor_specs, embed, rope_freq_factors, attention_inputs, block, final_norm, lm_head)
