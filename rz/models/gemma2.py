"""Gemma 2: the Gemma 3 graph (gemma3.py) without QK-norm: every other layer slides, attention
scores and final logits are soft-capped (its config), and the RoPE base is the same on every layer
(llama.cpp's gemma2 graph builder)."""

from dataclasses import replace

from rz.config import ModelConfig
from rz.models import gemma3


def tensor_specs(cfg: ModelConfig) -> gemma3.Weights:
    specs = gemma3.tensor_specs(cfg)
    return replace(specs, layers=tuple(replace(layer, q_norm=None, k_norm=None) for layer in specs.layers))


FAMILY = replace(gemma3.FAMILY, tensor_specs=tensor_specs)
