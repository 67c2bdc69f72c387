"""Phi-2: attention and a GELU MLP side by side on one LayerNorm's output, both added to the residual.

RoPE rotates only the first rope_dim values of each head (partial rotary); every projection,
norm and the LM head carry biases (llama.cpp's phi2 graph builder).
"""

from dataclasses import dataclass

import jax

from rz.config import ModelConfig
from rz.kv_cache import LayerView
from rz.models import attention
from rz.models.family import Family
from rz.models.layers import RopeTable, no_rope_freq_factors, embed as embed_rows, gelu, layer_norm, linear
from rz.weights import AttentionProjections, attention_projections, matrix, vector
from rz_kernels.quants import QTensor


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerWeights:
    attn_norm: jax.Array
    attn_norm_bias: jax.Array
    qkv: AttentionProjections
    wo: QTensor
    bo: jax.Array
    w_up: QTensor
    b_up: jax.Array
    w_down: QTensor
    b_down: jax.Array


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Weights:
    token_embd: QTensor
    layers: tuple[LayerWeights, ...]
    output_norm: jax.Array
    output_norm_bias: jax.Array
    output: QTensor
    output_bias: jax.Array


def tensor_specs(cfg: ModelConfig) -> Weights:
    n_embd, n_ff, n_vocab = cfg.n_embd, cfg.n_ff, cfg.n_vocab

    def layer(i: int) -> LayerWeights:
        blk = f"blk.{i}"
        return LayerWeights(
            attn_norm=vector(f"{blk}.attn_norm.weight", n_embd),
            attn_norm_bias=vector(f"{blk}.attn_norm.bias", n_embd),
            qkv=attention_projections(i, cfg),
            wo=matrix(f"{blk}.attn_output.weight", n_embd, cfg.n_head * cfg.head_dim_v),
            bo=vector(f"{blk}.attn_output.bias", n_embd),
            w_up=matrix(f"{blk}.ffn_up.weight", n_ff, n_embd),
            b_up=vector(f"{blk}.ffn_up.bias", n_ff),
            w_down=matrix(f"{blk}.ffn_down.weight", n_embd, n_ff),
            b_down=vector(f"{blk}.ffn_down.bias", n_embd),
        )

    return Weights(
        token_embd=matrix("token_embd.weight", n_vocab, n_embd),
        layers=tuple(layer(i) for i in range(cfg.n_layer)),
        output_norm=vector("output_norm.weight", n_embd),
        output_norm_bias=vector("output_norm.bias", n_embd),
        output=matrix("output.weight", n_vocab, n_embd),
        output_bias=vector("output.bias", n_vocab),
    )


def embed(weights: Weights, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    return embed_rows(weights.token_embd, tokens)


def _norm(w: LayerWeights, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    return layer_norm(x, w.attn_norm, w.attn_norm_bias, cfg.norm_eps)


rope_freq_factors = no_rope_freq_factors


def attention_inputs(w: LayerWeights, x: jax.Array, rope_table: RopeTable, layer: int, cfg: ModelConfig):
    queries, keys, values = attention.project_qkv(w.qkv, _norm(w, x, cfg), cfg)
    queries, keys = attention.rotate(queries, keys, rope_table, layer, cfg)
    # llama.cpp scales Q before the product rather than the scores, for f16 range.
    return queries * cfg.head_dim**-0.5, keys, values, 1.0


def block(
    w: LayerWeights, cache: LayerView, x: jax.Array, positions: jax.Array, rope_table: RopeTable, layer: int, cfg: ModelConfig
):
    with jax.named_scope("attention"):
        queries, keys, values, scale = attention_inputs(w, x, rope_table, layer, cfg)
        out, cache = attention.self_attention(cache, queries, keys, values, positions, scale, layer=layer, cfg=cfg)
        attention_out = linear(out, w.wo, w.bo)
    with jax.named_scope("mlp"):
        mlp_out = linear(gelu(linear(_norm(w, x, cfg), w.w_up, w.b_up)), w.w_down, w.b_down)
    return attention_out + mlp_out + x, cache


def final_norm(weights: Weights, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    return layer_norm(x, weights.output_norm, weights.output_norm_bias, cfg.norm_eps)


def lm_head(weights: Weights, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    return linear(hidden, weights.output, weights.output_bias)


FAMILY = Family(tensor_specs, embed, rope_freq_factors, attention_inputs, block, final_norm, lm_head)
