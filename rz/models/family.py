"""What a model family provides: each family module (llama.py, gemma3.py, ...) ends with its
FAMILY, naming its own functions, and rz.models drives them, once for all families."""

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Family:
    """The parts of a forward pass that differ between architectures.

    tensor_specs(cfg) -> the family's Weights pytree with tensor specs as leaves (see rz.weights)
    embed(weights, tokens, cfg) -> f32 [B, T, n_embd]
    rope_freq_factors(weights) -> f32 [rope_dim // 2] dividing every layer's RoPE angles, or None
    attention_inputs(layer_weights, x, rope_table, layer, cfg) -> (queries [B, T, H, D],
        keys [B, T, n_kv, D], values [B, T, n_kv, Dv], scale): from a block's input, RoPE applied
    block(layer_weights, layer_cache, x, positions, rope_table, layer, cfg) -> (x, layer_cache)
    final_norm(weights, x, cfg) -> hidden f32 [B, T, n_embd]
    lm_head(weights, hidden, cfg) -> logits f32 [..., n_vocab]
    """

    tensor_specs: Callable
    embed: Callable
    rope_freq_factors: Callable
    attention_inputs: Callable
    block: Callable
    final_norm: Callable
    lm_head: Callable
