"""The compiled steps an engine runs: pure functions of weights, KV cache and a batch, jitted once here.

A model's family, config and tensor-parallel plan (rz.sharding; None on one device) are static
arguments, its weights and cache ordinary ones, and the
cache (with the sampler state in a decode step) is donated, so a step updates it in place. Being
module-level functions, the steps are keyed by (family, config, shapes) and hold no engine: an
engine that is dropped is freed at once, with its KV cache.
"""

from functools import partial

import jax
import jax.numpy as jnp

from rz import kv_cache
from rz.models import forward, lm_head, rope_tables, rope_tables_for
from rz.sampling import Sampler, SamplerState


@partial(jax.jit, static_argnames=("family", "cfg", "plan"), donate_argnames=("cache",))
def prefill(weights, cache, tokens, positions, tables, last_index, *, family, cfg, plan=None):
    """A prompt chunk into the cache: tokens, positions [1, T] -> (logits f32 [1, n_vocab] at last_index [1], cache)."""
    hidden, cache = forward(weights, cache, tokens, positions, tables, family=family, cfg=cfg, plan=plan)
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
    return lm_head(weights, last, family=family, cfg=cfg, plan=plan), cache


@partial(jax.jit, static_argnames=("family", "cfg", "plan"), donate_argnames=("cache",))
def score(weights, cache, tokens, positions, tables, *, family, cfg, plan=None):
    """A chunk of a teacher-forced pass: tokens, positions [1, T] -> (logits f32 [1, T, n_vocab], cache)."""
    hidden, cache = forward(weights, cache, tokens, positions, tables, family=family, cfg=cfg, plan=plan)
    return lm_head(weights, hidden, family=family, cfg=cfg, plan=plan), cache


# A chunk's RoPE tables, made outside its step (see rz.models.rope_tables).
chunk_rope_tables = jax.jit(rope_tables_for, static_argnames=("cfg",))

# A prefilled one-row cache into a batch row of the engine's cache.
insert = jax.jit(kv_cache.insert_row, donate_argnums=(0,))

# A batch row of the engine's cache as a one-row cache of a context bucket, to prefill a prompt's
# tail after the prefix the row already holds.
extract = jax.jit(kv_cache.extract_row, static_argnames=("size",))


# A joining request's sampler state into its slot's row of the batch's.
join_row = jax.jit(SamplerState.with_row)


@partial(jax.jit, static_argnames=("n_top",))
def first_token(logits, tensors, state, allowed, *, n_top):
    """A prefilled prompt's first token, sampled from its last logits (allowed: see Sampler)."""
    return Sampler(n_top_logprobs=n_top)(logits, tensors, state, allowed)


@partial(jax.jit, static_argnames=("family", "cfg", "plan", "n_ctx", "n_top", "n_steps"), donate_argnames=("cache", "state"))
def decode(weights, cache, tokens, positions, tensors, state, allowed, *, family, cfg, plan=None, n_ctx, n_top, n_steps):
    """n_steps decode steps in one call, each feeding its sampled tokens to the next.

    allowed: the token bitmask of every row (see Sampler), or None. It holds for every step, so a
    constrained batch, whose masks depend on each sampled token, runs one step per call.

    tokens, positions int32 [rows] (position -1: an idle row), for the first `rows` slots of the
    cache (a batch bucket). Returns the SampledTokens of every step (leaves [n_steps, rows, ...]),
    the cache and sampler state, and the tokens and positions that the next call would take (so
    that it can be launched before this one's tokens reach the host). A row whose next position
    would pass the context becomes padding (position -1) instead of wrapping.
    """
    sampler = Sampler(n_top_logprobs=n_top)
    # The cache is read and written in place; the sampler state of the other slots is left as it is.
    rows = tokens.shape[0]
    whole_state, state = state, jax.tree.map(lambda leaf: leaf[:rows], state)

    # Every step's RoPE tables, made before the loop (see rz.models.rope_tables). A row's
    # position at step s is its first one plus s (a padding row's table is never used).
    step_positions = jnp.maximum(positions, 0)[None, :, None] + jnp.arange(n_steps, dtype=positions.dtype)[:, None, None]
    step_tables = rope_tables(weights, step_positions, family=family, cfg=cfg)

    def one(carry, tables):
        cache, tokens, positions, state = carry
        hidden, cache = forward(weights, cache, tokens[:, None], positions[:, None], tables, family=family, cfg=cfg, plan=plan)
        logits = lm_head(weights, hidden[:, 0], family=family, cfg=cfg, plan=plan)
        sampled, state = sampler(logits, tensors, state, allowed)
        following = jnp.where((positions >= 0) & (positions + 1 < n_ctx), positions + 1, -1)
        return (cache, sampled.tokens, following, state), sampled

    (cache, tokens, positions, state), sampled = jax.lax.scan(one, (cache, tokens, positions, state), step_tables, length=n_steps)
    state = jax.tree.map(lambda whole, part: whole.at[:rows].set(part), whole_state, state)
    return sampled, cache, state, tokens, positions


@partial(jax.jit, static_argnames=("family", "cfg", "plan", "n_top"), donate_argnames=("cache", "state"))
def verify(weights, cache, tokens, positions, tables, tensors, state, *, family, cfg, plan=None, n_top):
    """Score each row's last token and the drafts after it in one pass, and keep what the sampler agrees with.

    tokens, positions int32 [rows, W]: per row its last sampled token, then up to W - 1 drafted
    tokens (position -1 after a row's drafts; an idle row is all -1). The sampler runs at each of
    the W positions in turn, as W decode steps would, its state advancing as theirs would, so its
    token at position j is the one plain decoding would sample there given the drafts before j:
    a row keeps its drafts while they equal the sampler's tokens, then the sampler's next token
    (rz.speculative says why that is the speculative-sampling rule for a drafted token).

    tables: chunk_rope_tables of positions. Returns the SampledTokens at every position (leaves [W, rows, ...]), how many of them each row
    emits (int32 [rows], at least 1 for a live row), the cache, and the sampler state as it stands
    after each row's last emitted token. The cache holds only what was kept, as attention sees it.
    A global layer's rejected drafts stay in their slots as stale later positions, which causality
    hides until the tokens at those positions overwrite them (the cache already holds such slots
    when a batch row is reused). A ring buffer's rejected drafts overwrote keys still inside the
    window, so their slots get their previous keys, values and positions back; only ring layers
    save them, since reading a layer before its in-place write makes XLA copy the whole layer.
    """
    sampler = Sampler(n_top_logprobs=n_top)
    rows, width = tokens.shape
    whole_state, state = state, jax.tree.map(lambda leaf: leaf[:rows], state)
    rings = [index for index, sliding in enumerate(cfg.sliding_layers) if sliding]
    overwritten = [_slots_at(cache.layers[index], positions) for index in rings]
    hidden, cache = forward(weights, cache, tokens, positions, tables, family=family, cfg=cfg, plan=plan)
    logits = lm_head(weights, hidden, family=family, cfg=cfg, plan=plan)

    def one(state, logits_at):
        sampled, state = sampler(logits_at, tensors, state)
        return state, (sampled, state)

    _, (sampled, states) = jax.lax.scan(one, state, jnp.swapaxes(logits, 0, 1))
    # Draft j + 1 is kept while it, and every draft before it, is the token sampled at position j.
    agrees = (sampled.tokens[:-1].T == tokens[:, 1:]) & (positions[:, 1:] >= 0)
    n_kept = jnp.sum(jnp.cumprod(agrees, axis=1), axis=1)
    n_emitted = jnp.where(positions[:, 0] >= 0, n_kept + 1, 0).astype(jnp.int32)
    last = jnp.maximum(n_emitted - 1, 0)
    state = jax.tree.map(lambda leaf: leaf[last, jnp.arange(rows)], states)
    state = jax.tree.map(lambda whole, part: whole.at[:rows].set(part), whole_state, state)
    rejected = jnp.arange(width)[None, :] > n_kept[:, None]
    layers = list(cache.layers)
    for index, old in zip(rings, overwritten):
        layers[index] = _restore(layers[index], old, positions, rejected)
    cache = kv_cache.KVCache(tuple(layers))
    return sampled, n_emitted, cache, state


def _slots_at(layer: kv_cache.LayerCache, positions):
    """What a layer's cache holds in the slots a chunk at positions [rows, W] will write."""
    rows = jnp.arange(positions.shape[0])[:, None]
    slots = jnp.maximum(positions, 0) % layer.n_slots
    # jax.tree.map: keys and values are arrays or, in a q8_0 cache, quants with their scales.
    def at_slots(stored):
        return jax.tree.map(lambda leaf: leaf[rows, :, slots], stored)

    return at_slots(layer.keys), at_slots(layer.values), layer.positions[rows, slots]


def _restore(layer: kv_cache.LayerCache, old, positions, rejected) -> kv_cache.LayerCache:
    """The layer with the slots of the rejected chunk positions put back as _slots_at found them."""
    old_keys, old_values, old_positions = old
    n_slots = layer.n_slots
    rows = jnp.broadcast_to(jnp.arange(positions.shape[0])[:, None], positions.shape)
    slots = jnp.where(rejected & (positions >= 0), positions % n_slots, n_slots)  # n_slots: dropped

    def put_back(stored, old_stored):
        return jax.tree.map(lambda leaf, old: leaf.at[rows, :, slots].set(old, mode="drop"), stored, old_stored)

    return kv_cache.LayerCache(
        keys=put_back(layer.keys, old_keys),
        values=put_back(layer.values, old_values),
        positions=layer.positions.at[rows, slots].set(old_positions, mode="drop"),
    )


ALL = (prefill, score, chunk_rope_tables, insert, extract, join_row, first_token, decode, verify)


def compiled_variants() -> int:
    """How many shape variants of the compiled steps this process holds: constant once a session is warm."""
    return sum(step._cache_size() for step in ALL)
