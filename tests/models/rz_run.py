"""Running rz models in tests: load a GGUF, and teacher-force a token sequence through the KV cache."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rz import kv_cache
from rz.config import ModelConfig
from rz.kv_cache import CacheTypes
from rz.gguf import GGUFFile
from rz.models import Model, load_model


EXACT = CacheTypes("f32", "f32")


def load(path: Path, n_ctx: int | None = None) -> Model:
    """The model at path, configured for n_ctx positions per sequence where given (ModelConfig.for_context)."""
    gguf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gguf)
    return load_model(gguf, cfg if n_ctx is None else cfg.for_context(n_ctx))


def rz_logits(
    model: Model, tokens: list[int], chunk: int | None = None, max_seq_len: int | None = None, cache_types: CacheTypes = EXACT
) -> np.ndarray:
    """Logits f32 [T, n_vocab] for tokens at positions 0..T-1, fed `chunk` at a time (all at once
    by default) through one cache of cache_types (f32 by default: the model's math exactly); the
    last chunk is padded to the same shape, so one compile serves."""
    length = len(tokens)
    chunk = chunk or length
    forward = jax.jit(model.forward, donate_argnums=(1,))
    lm_head = jax.jit(model.lm_head)
    cache = kv_cache.init_cache(model.cfg, 1, max_seq_len or length, cache_types)
    logits = []
    for start in range(0, length, chunk):
        piece = tokens[start : start + chunk]
        padding = chunk - len(piece)
        chunk_tokens = jnp.array([list(piece) + [0] * padding], jnp.int32)
        positions = jnp.array([list(range(start, start + len(piece))) + [-1] * padding], jnp.int32)
        hidden, cache = forward(model.weights, cache, chunk_tokens, positions)
        logits.append(np.asarray(lm_head(model.weights, hidden))[0, : len(piece)])
    return np.concatenate(logits)
