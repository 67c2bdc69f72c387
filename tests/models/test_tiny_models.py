"""Tiny random models of every architecture: rz's logits against llama.cpp's, and against a float64 reference."""

import numpy as np
import pytest

from oracle import MAX_MEAN_KL, MIN_TOP1_AGREEMENT, kl_divergence, llama_cpp_logits, nmse
from reference_np import ReferenceModel
from rz_run import load, rz_logits
from rz.kv_cache import CacheTypes
from rz_kernels.attention_kv import CACHE_TYPES
from tiny_models import K_QUANT_SHAPE, N_VOCAB, TINY_ARCHITECTURES, WEIGHT_TYPES, comparable_tiny_model, write_tiny_model

# llama.cpp's own tolerance for comparing backends (test-backend-ops). Its CPU matmuls quantize
# activations to 8 bits for quantized weights, which is most of the difference at Q8_0.
LLAMA_CPP_NMSE = 5e-4
# rz in f32 against a float64 evaluation of the same weights.
REFERENCE_NMSE = 1e-9

# Longer than the tiny Gemma's window (8) and the YaRN variant's original context (32).
N_TOKENS = 64

VARIANTS = {
    "llama-linear-rope-and-rope-freqs": (
        "llama",
        dict(rope_scaling="linear", rope_scaling_factor=2.0, rope_freq_factors=True),
    ),
    # llama.cpp ignores a sliding window in the llama architecture (Mistral's), and so does rz.
    "llama-sliding-window-metadata": ("llama", dict(sliding_window=16)),
    "qwen2-yarn": ("qwen2", dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_scaling_original_context=32)),
    "phi2-separate-qkv": ("phi2", dict(fused_qkv=False)),
    "gemma3-final-softcap-linear-rope": (
        "gemma3",
        dict(final_logit_softcap=5.0, rope_scaling="linear", rope_scaling_factor=4.0),
    ),
    "gemma3-no-sliding-window": ("gemma3", dict(sliding_window=0)),
    # Phi-3-mini-4k: separate tensors, full rotary, no LongRoPE factors or attn_factor.
    "phi3-separate-qkv-plain-rope": (
        "phi3",
        dict(fused_qkv=False, rope_dim=16, long_rope_factors=False, rope_attn_factor=0.0, rope_scaling_original_context=0),
    ),
    # Gemma 2 27B's 46 layers scale queries by n_embd / n_head, not head_dim.
    "gemma2-27b-query-scale": ("gemma2", dict(n_layer=46, n_embd=32, n_ff=32)),
    "qwen3-untied-output": ("qwen3", dict(tie_embeddings=False)),
    # Unlike Gemma 3's, Gemma 2's sliding layers are scaled as its global ones are.
    "gemma2-linear-rope": ("gemma2", dict(rope_scaling="linear", rope_scaling_factor=4.0)),
    # Mixtral: the llama architecture with experts, top 2 of 4.
    "llama-mixtral-experts": ("llama", dict(n_expert=4, n_expert_used=2)),
    "qwen3moe-top-4-of-16": ("qwen3moe", dict(n_expert=16, n_expert_used=4)),
}


def prompt(seed: int = 0) -> list[int]:
    return [1] + [int(t) for t in np.random.default_rng(seed).integers(3, N_VOCAB, N_TOKENS - 1)]


@pytest.mark.parametrize("weight_type", WEIGHT_TYPES)
@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_logits_match_llama_cpp(tmp_path, architecture, weight_type):
    path = comparable_tiny_model(tmp_path / "model.gguf", architecture, weight_type)
    assert_logits_match_llama_cpp(path, f"{architecture} {weight_type}")


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_k_quant_logits_match_llama_cpp(tmp_path, architecture):
    path = comparable_tiny_model(tmp_path / "model.gguf", architecture, "Q4_K", **K_QUANT_SHAPE)
    assert_logits_match_llama_cpp(path, f"{architecture} Q4_K")


def assert_logits_match_llama_cpp(path, label: str) -> None:
    tokens = prompt()
    error = nmse(rz_logits(load(path), tokens), llama_cpp_logits(path, tokens))
    assert error <= LLAMA_CPP_NMSE, f"{label}: NMSE {error:.2e} against llama.cpp"


def test_longrope_long_factors_match_llama_cpp(tmp_path):
    """Phi-3's LongRoPE run with a context beyond its original one (256): both engines take the long
    factors at every position. Their logits are not the short factors' (what rz ran before)."""
    path = comparable_tiny_model(tmp_path / "model.gguf", "phi3", "F16")
    tokens, n_ctx = prompt(), 512
    theirs = llama_cpp_logits(path, tokens, n_ctx=n_ctx)
    error = nmse(rz_logits(load(path, n_ctx), tokens), theirs)
    assert error <= LLAMA_CPP_NMSE, f"long factors: NMSE {error:.2e} against llama.cpp"
    assert nmse(rz_logits(load(path), tokens), theirs) > 100 * LLAMA_CPP_NMSE


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
def test_each_cache_type_matches_llama_cpp_with_that_cache(tmp_path, cache_type):
    """K and V stored as cache_type in both engines (a Gemma 3, whose 32-wide heads q8_0 can hold,
    with sliding-window layers): llama.cpp's bound for its default cache, top-1 >= 95% and mean
    KL <= 0.01, over a sequence past the window."""
    path = write_tiny_model(tmp_path / "model.gguf", "gemma3", "F16")
    tokens = prompt()
    ours = rz_logits(load(path), tokens, chunk=16, max_seq_len=N_TOKENS, cache_types=CacheTypes(cache_type, cache_type))
    theirs = llama_cpp_logits(path, tokens, cache_type=cache_type)
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    kl = kl_divergence(theirs, ours).mean()
    assert top1 >= MIN_TOP1_AGREEMENT and kl <= MAX_MEAN_KL, f"{cache_type}: top-1 {top1:.2%}, mean KL {kl:.2e}"
    assert nmse(ours, theirs) <= LLAMA_CPP_NMSE


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_logits_match_llama_cpp(tmp_path, variant):
    architecture, overrides = VARIANTS[variant]
    path = comparable_tiny_model(tmp_path / "model.gguf", architecture, "F16", **overrides)
    assert_logits_match_llama_cpp(path, variant)


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_logits_match_float64_reference(tmp_path, architecture):
    """The model math, exactly: F16 weights take the XLA path, whose activations stay f32. (Quantized
    weights take the CPU kernel, which rounds activations to int8 as llama.cpp does; those are held
    to llama.cpp's logits above.)"""
    path = write_tiny_model(tmp_path / "model.gguf", architecture, "F16")
    tokens = prompt()
    error = nmse(rz_logits(load(path), tokens), ReferenceModel(path).logits(tokens))
    assert error <= REFERENCE_NMSE, f"{architecture}: NMSE {error:.2e} against the float64 reference"
