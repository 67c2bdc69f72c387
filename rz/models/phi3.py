"""Phi-3 (Phi-3, Phi-3.5, Phi-4-mini): the llama graph on fused tensors (llama.cpp's phi3 graph builder).

Queries, keys and values are rows of one attn_qkv (or separate tensors); the MLP's gate and up
are the two halves of one ffn_up, which ggml_swiglu splits. LongRoPE divides each pair's angle by
a factor and scales the values by the file's attn_factor (rz.models.layers.Rope). As llama.cpp,
the short factors while the context fits in the original training context
(rope.scaling.original_context_length), the long ones beyond it (ModelConfig.for_context).
"""

from dataclasses import replace

from rz.config import ModelConfig
from rz.models import llama
from rz.weights import matrix, optional, vector


def tensor_specs(cfg: ModelConfig) -> llama.Weights:
    specs = llama.tensor_specs(cfg)
    n_ff, n_embd = cfg.n_ff, cfg.n_embd

    def fused_half(i: int, half: int):
        return matrix(f"blk.{i}.ffn_up.weight", 2 * n_ff, n_embd, rows=(half * n_ff, (half + 1) * n_ff))

    layers = tuple(
        replace(
            layer,
            mlp=replace(layer.mlp, w_gate=fused_half(i, 0), w_up=fused_half(i, 1)),
            rope_freq_factors=optional(vector(f"rope_factors_{'long' if cfg.rope_long_factors else 'short'}.weight", cfg.rope_dim // 2)),
        )
        for i, layer in enumerate(specs.layers)
    )
    return replace(specs, layers=layers)


FAMILY = replace(llama.FAMILY, tensor_specs=tensor_specs)
