"""What every attention path (rz_kernels.causal_attention, its Pallas and C++ kernels, rz's attention
maps) does to a score: which keys a query sees, and the soft cap."""

import jax
import jax.numpy as jnp


def visible(query_positions: jax.Array, key_positions: jax.Array, window: int) -> jax.Array:
    """bool, elementwise over broadcast positions: may the query at position p see the key at k?

    k must be a real position (>= 0) with k <= p, and with window > 0 also k > p - window
    (llama.cpp's masks, is_masked_swa for the window). Callers broadcast queries against keys,
    e.g. q_positions[:, :, None] against k_positions[:, None, :] for [B, T, S].
    """
    seen = (key_positions >= 0) & (key_positions <= query_positions)
    if window:
        seen &= key_positions > query_positions - window
    return seen


def capped(scores: jax.Array, softcap: float) -> jax.Array:
    """softcap * tanh(scores / softcap), or the scores as they are when softcap is 0."""
    return softcap * jnp.tanh(scores / softcap) if softcap else scores
