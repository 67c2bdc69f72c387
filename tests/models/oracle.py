"""llama.cpp (through llama-cpp-python) as the oracle, and the measures rz is held to against it."""

from pathlib import Path

import llama_cpp
import numpy as np

from rz_kernels.ggml_types import GGMLType

# What rz is held to against llama.cpp, teacher-forced (issue 17: within llama.cpp's own noise).
MIN_TOP1_AGREEMENT = 0.95
MAX_MEAN_KL = 0.01


def llama_cpp_logits(path: Path, tokens: list[int], n_ctx: int | None = None, cache_type: str = "f16") -> np.ndarray:
    """llama.cpp's logits f32 [T, n_vocab] for every position of tokens, evaluated from position 0,
    its KV cache (K and V) of cache_type. llama.cpp stores a q8_0 V cache only with flash
    attention, so q8_0 turns it on."""
    ggml_type = int(GGMLType[cache_type.upper()])
    llm = llama_cpp.Llama(
        model_path=str(path), logits_all=True, n_ctx=n_ctx or max(64, len(tokens)), verbose=False,
        type_k=ggml_type, type_v=ggml_type, flash_attn=cache_type == "q8_0",
    )
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def llama_cpp_tokenize(path: Path, text: str) -> list[int]:
    """Token ids of text, with the model's BOS, from llama.cpp's tokenizer."""
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=True)
    finally:
        llm.close()


def nmse(ours: np.ndarray, reference: np.ndarray) -> float:
    """Normalized mean squared error, llama.cpp's test-backend-ops measure: sum (a-b)^2 / sum b^2."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.sum((ours - reference) ** 2) / np.sum(reference**2))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per position, in nats, for logits [..., n_vocab]."""
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
