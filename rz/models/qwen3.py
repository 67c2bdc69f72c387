"""Qwen3 and Qwen3-MoE: the llama graph with each query and key head RMS-normalized before RoPE
(QK-norm), NeoX RoPE and no q/k/v biases (llama.cpp's qwen3 and qwen3moe graph builders). Only
its tensors differ from llama.py's; the MoE's experts are llama.py's too (moe.py)."""

from dataclasses import replace

from rz.config import ModelConfig
from rz.models import llama
from rz.weights import vector


def tensor_specs(cfg: ModelConfig) -> llama.Weights:
    specs = llama.tensor_specs(cfg)
    layers = tuple(
        replace(
            layer,
            q_norm=vector(f"blk.{i}.attn_q_norm.weight", cfg.head_dim),
            k_norm=vector(f"blk.{i}.attn_k_norm.weight", cfg.head_dim),
        )
        for i, layer in enumerate(specs.layers)
    )
    return replace(specs, layers=layers)


FAMILY = replace(llama.FAMILY, tensor_specs=tensor_specs)
