"""The llama graph (SmolLM2, TinyLlama, Llama 2/3, Mistral, Mixtral, DeepSeek-Coder), which Qwen2,
Qwen3, Qwen3-MoE, SmolLM3 and Phi-3 share.

Pre-norm blocks: RMSNorm, grouped-query attention with RoPE, a residual add, RMSNorm, a SwiGLU
MLP or a mixture of experts (moe.py), a residual add (llama.cpp's llama, qwen2, qwen3, qwen3moe,
smollm3 and phi3 graph builders). Every bias is optional, as in llama.cpp: Qwen2 files carry
q/k/v biases, Llama files none. The families that differ only in their tensors declare them in
their own file (qwen3.py, phi3.py).
"""

from dataclasses import dataclass

import jax

from rz.config import ModelConfig
from rz.kv_cache import LayerView
from rz.models import attention, moe
from rz.models.family import Family
from rz.models.layers import RopeTable, embed as embed_rows, linear, rms_norm, swiglu_mlp
from rz.weights import AttentionProjections, Either, attention_projections, matrix, optional, vector
from rz_kernels.quants import QTensor


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Mlp:
    """A SwiGLU MLP."""

    w_gate: QTensor
    w_up: QTensor
    w_down: QTensor
    b_gate: jax.Array | None  # absent from the file: None, no add
    b_up: jax.Array | None  # absent from the file: None, no add
    b_down: jax.Array | None  # absent from the file: None, no add


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class LayerWeights:
    attn_norm: jax.Array
    qkv: AttentionProjections
    q_norm: jax.Array | None  # Qwen3's QK-norm; None in the other families
    k_norm: jax.Array | None
    wo: QTensor
    bo: jax.Array | None  # absent from the file: None, no add
    rope_freq_factors: jax.Array | None  # Llama 3's rope_freqs (Phi-3's short factors), shared by all layers; None otherwise
    ffn_norm: jax.Array
    mlp: Mlp | moe.Experts  # experts in Mixtral and Qwen3-MoE files


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Weights:
    token_embd: QTensor
    layers: tuple[LayerWeights, ...]
    output_norm: jax.Array
    output: QTensor  # the token embedding itself when the model ties them
    output_bias: jax.Array | None  # absent from the file: None, no add


def tensor_specs(cfg: ModelConfig) -> Weights:
    n_embd, n_ff, n_vocab = cfg.n_embd, cfg.n_ff, cfg.n_vocab

    def layer(i: int) -> LayerWeights:
        blk = f"blk.{i}"
        return LayerWeights(
            attn_norm=vector(f"{blk}.attn_norm.weight", n_embd),
            qkv=attention_projections(i, cfg),
            q_norm=None,
            k_norm=None,
            wo=matrix(f"{blk}.attn_output.weight", n_embd, cfg.n_head * cfg.head_dim_v),
            bo=optional(vector(f"{blk}.attn_output.bias", n_embd)),
            rope_freq_factors=optional(vector("rope_freqs.weight", cfg.rope_dim // 2)),
            ffn_norm=vector(f"{blk}.ffn_norm.weight", n_embd),
            mlp=moe.expert_specs(i, cfg) if cfg.n_expert else mlp(blk),
        )

    def mlp(blk: str) -> Mlp:
        return Mlp(
            w_gate=matrix(f"{blk}.ffn_gate.weight", n_ff, n_embd),
            w_up=matrix(f"{blk}.ffn_up.weight", n_ff, n_embd),
            w_down=matrix(f"{blk}.ffn_down.weight", n_embd, n_ff),
            b_gate=optional(vector(f"{blk}.ffn_gate.bias", n_ff)),
            b_up=optional(vector(f"{blk}.ffn_up.bias", n_ff)),
            b_down=optional(vector(f"{blk}.ffn_down.bias", n_embd)),
        )

    return Weights(
        token_embd=matrix("token_embd.weight", n_vocab, n_embd),
        layers=tuple(layer(i) for i in range(cfg.n_layer)),
        output_norm=vector("output_norm.weight", n_embd),
        output=Either((matrix("output.weight", n_vocab, n_embd), matrix("token_embd.weight", n_vocab, n_embd))),
        output_bias=optional(vector("output.bias", n_vocab)),
    )


def embed(weights: Weights, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    return embed_rows(weights.token_embd, tokens)


def rope_freq_factors(weights: Weights) -> jax.Array | None:
    """Llama 3's rope_freqs or Phi-3's rope factors (one tensor, which every layer's weights hold), or None."""
    return weights.layers[0].rope_freq_factors


def attention_inputs(w: LayerWeights, x: jax.Array, rope_table: RopeTable, layer: int, cfg: ModelConfig):
    queries, keys, values = attention.project_qkv(w.qkv, rms_norm(x, w.attn_norm, cfg.norm_eps), cfg)
    queries, keys = attention.normalize_heads(queries, keys, w.q_norm, w.k_norm, cfg)
    queries, keys = attention.rotate(queries, keys, rope_table, layer, cfg)
    return queries, keys, values, cfg.head_dim**-0.5


def block(
    w: LayerWeights, cache: LayerView, x: jax.Array, positions: jax.Array, rope_table: RopeTable, layer: int, cfg: ModelConfig
):
    with jax.named_scope("attention"):
        queries, keys, values, scale = attention_inputs(w, x, rope_table, layer, cfg)
        out, cache = attention.self_attention(cache, queries, keys, values, positions, scale, layer=layer, cfg=cfg)
        x = x + linear(out, w.wo, w.bo)
    with jax.named_scope("mlp"):
        x = x + feed_forward(w.mlp, rms_norm(x, w.ffn_norm, cfg.norm_eps), cfg)
    return x, cache


def feed_forward(w: Mlp | moe.Experts, h: jax.Array, cfg: ModelConfig) -> jax.Array:
    if isinstance(w, moe.Experts):
        return moe.feed_forward(w, h, cfg)
    return swiglu_mlp(h, w.w_gate, w.w_up, w.w_down, (w.b_gate, w.b_up, w.b_down))


def final_norm(weights: Weights, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    return rms_norm(x, weights.output_norm, cfg.norm_eps)


def lm_head(weights: Weights, hidden: jax.Array, cfg: ModelConfig) -> jax.Array:
    return linear(hidden, weights.output, weights.output_bias)


FAMILY = Family(tensor_specs, embed, rope_freq_factors, attention_inputs, block, final_norm, lm_head)
