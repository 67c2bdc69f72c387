"""The compiled steps an engine runs: pure functions of weights, KV cache and a batch, jitted once here.

A model's family, config and tensor-parallel plan (rz.sharding; None on one device) are static
arguments, its weights and cache ordinary ones, and the
cache (with the sampler state in a decode step) is donated, so a step updates it in place. Being
module-level functions, the steps are keyed by (family, config, shapes) and hold no engine: an
engine that is dropped is freed at once, with its KV cache.
"""

from dataclasses import replace
from functools import partial

import jax
import jax.numpy as jnp
import jaxlib

from rz import kv_cache
from rz.models import forward, lm_head, rope_tables, rope_tables_for
from rz.sampling import Sampler, SamplerState


# Every step is compiled with XLA:CPU's classic fusion emitters. Its MLIR emitters need tens of
# MiB more working memory to compile a step (~140 MiB more for the sampler's ~1,000 small ops,
# memory-session18.md), and compiling is the peak of an engine's memory; since the layers became
# one loop they compile the transformer steps no faster either (the measurements are in
# benchmarks/results/memory-session33.md). The classic emitters turn a scatter into a loop of
# small kernels per token, so on CPU the KV cache writes are a C++ call (rz_kernels.cache_write;
# without the kernels built the loop stays, a few percent of a prompt chunk's time).
# Only on the jaxlib this was measured with: an XLA without the option refuses it when compiling.
STEP_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False} if jaxlib.__version__.startswith("0.10.") else {}


@partial(jax.jit, static_argnames=("family", "cfg", "plan"), donate_argnames=("cache",), compiler_options=STEP_COMPILER_OPTIONS)
def prefill(weights, cache, tokens, positions, tables, last_index, *, family, cfg, plan=None):
    """A prompt chunk into the cache: tokens, positions [1, T] -> (logits f32 [1, n_vocab] at last_index [1], cache)."""
    hidden, cache = forward(weights, cache, tokens, positions, tables, family=family, cfg=cfg, plan=plan)
    last = jnp.take_along_axis(hidden, last_index[:, None, None], axis=1)[:, 0]
    return lm_head(weights, last, family=family, cfg=cfg, plan=plan), cache


@partial(jax.jit, static_argnames=("family", "cfg", "plan"), donate_argnames=("cache",), compiler_options=STEP_COMPILER_OPTIONS)
def score(weights, cache, tokens, positions, tables, *, family, cfg, plan=None):
    """A chunk of a teacher-forced pass: tokens, positions [1, T] -> (logits f32 [1, T, n_vocab], cache)."""
    hidden, cache = forward(weights, cache, tokens, positions, tables, family=family, cfg=cfg, plan=plan)
    return lm_head(weights, hidden, family=family, cfg=cfg, plan=plan), cache


# A chunk's RoPE tables, made outside its step (see rz.models.rope_tables).
chunk_rope_tables = jax.jit(rope_tables_for, static_argnames=("cfg",))

# A prefix's blocks copied from the row that holds it into the row a prompt takes (kv_cache.copy_blocks).
copy_blocks = jax.jit(kv_cache.copy_blocks, donate_argnums=(0,))


# A joining request's sampler state into its slot's row of the batch's.
join_row = jax.jit(SamplerState.with_row)


@partial(jax.jit, static_argnames=("n_top",), compiler_options=STEP_COMPILER_OPTIONS)
def first_token(logits, tensors, state, allowed, logprobs=None, *, n_top):
    """A prefilled prompt's first token, sampled from its last logits (allowed, logprobs: see Sampler)."""
    return Sampler(n_top_logprobs=n_top)(logits, tensors, state, allowed, logprobs)


@partial(
    jax.jit, static_argnames=("family", "cfg", "plan", "n_ctx", "n_top", "n_steps"), donate_argnames=("cache", "state"),
    compiler_options=STEP_COMPILER_OPTIONS,
)
def decode(
    weights, cache, tokens, positions, tensors, state, allowed, logprobs=None, n_live=None, *, family, cfg, plan=None, n_ctx,
    n_top, n_steps,
):
    """n_steps decode steps in one call, each feeding its sampled tokens to the next.

    allowed: the token bitmask of every row (see Sampler), or None. It holds for every step, so a
    constrained batch, whose masks depend on each sampled token, runs one step per call: n_live,
    an int32 scalar, is how many of the n_steps run (None: all). The loop stops there: the cache
    and the sampler state are as those steps left them, and the other steps' SampledTokens are
    zeros. So constrained and free batches, with log-probabilities or without (logprobs: a bool
    scalar, see Sampler.chosen; None: always), share one compiled step per batch: a compiled
    step holds memory in proportion to its size.

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
        sampled, state = sampler(logits, tensors, state, allowed, logprobs)
        following = jnp.where((positions >= 0) & (positions + 1 < n_ctx), positions + 1, -1)
        return (cache, sampled.tokens, following, state), sampled

    # A loop of n_live iterations (a while loop: no branch per step), each writing its step's
    # SampledTokens into [n_steps, ...] zeros.
    carry = (cache, tokens, positions, state)
    shapes = jax.eval_shape(one, carry, jax.tree.map(lambda table: table[0], step_tables))[1]
    sampled = jax.tree.map(lambda leaf: jnp.zeros((n_steps, *leaf.shape), leaf.dtype), shapes)

    def body(index, loop):
        carry, sampled = loop
        carry, at_step = one(carry, jax.tree.map(lambda table: table[index], step_tables))
        return carry, jax.tree.map(lambda whole, part: whole.at[index].set(part), sampled, at_step)

    trips = n_steps if n_live is None else jnp.minimum(n_live, n_steps)
    carry, sampled = jax.lax.fori_loop(0, trips, body, (carry, sampled))
    cache, tokens, positions, state = carry
    state = jax.tree.map(lambda whole, part: whole.at[:rows].set(part), whole_state, state)
    return sampled, cache, state, tokens, positions


@partial(
    jax.jit, static_argnames=("family", "cfg", "plan", "n_ctx", "n_drafts"), donate_argnames=("cache",),
    compiler_options=STEP_COMPILER_OPTIONS,
)
def draft(weights, cache, tokens, positions, tensors, state, *, family, cfg, plan=None, n_ctx, n_drafts):
    """A draft model's n_drafts tokens after each row's last one, sampled one by one as decode steps would.

    tokens, positions int32 [rows]: each row's last sampled token and its position (-1: a row that
    does not draft). Returns the drafts int32 [rows, n_drafts], the distribution each was drawn from
    f32 [rows, n_drafts, n_vocab] (one-hot for a greedy row: Sampler.probabilities), and the cache.
    The sampler state is the target's, read only: the draft draws with keys of its own, derived from
    the row's, so that the verify call's draws are independent of the draft's.

    The cache keeps what the draft wrote, stale later positions that the verify call overwrites
    or causality hides (see verify).
    """
    sampler = Sampler()
    rows = tokens.shape[0]
    state = jax.tree.map(lambda leaf: leaf[:rows], state)
    state = replace(state, keys=jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys, _DRAFT_STREAM))
    fed = jnp.where(positions[None, :] >= 0, positions[None, :] + jnp.arange(n_drafts, dtype=positions.dtype)[:, None], -1)
    fed = jnp.where(fed < n_ctx, fed, -1)  # [n_drafts, rows]: the positions of the tokens fed at each step
    step_tables = rope_tables(weights, jnp.maximum(fed, 0)[:, :, None], family=family, cfg=cfg)

    def one(carry, step):
        cache, tokens, state = carry
        positions, tables = step
        hidden, cache = forward(weights, cache, tokens[:, None], positions[:, None], tables, family=family, cfg=cfg, plan=plan)
        logits = lm_head(weights, hidden[:, 0], family=family, cfg=cfg, plan=plan)
        probabilities = sampler.probabilities(logits, tensors, state)
        split = jax.vmap(jax.random.split)(state.keys)
        uniforms = jax.vmap(jax.random.uniform)(split[:, 1])
        drafted = _inverse_cdf(probabilities, uniforms)
        recent = jnp.concatenate([state.recent_tokens[:, 1:], drafted[:, None]], axis=1)
        return (cache, drafted, SamplerState(keys=split[:, 0], recent_tokens=recent)), (drafted, probabilities)

    (cache, _, _), (drafts, probabilities) = jax.lax.scan(one, (cache, tokens, state), (fed, step_tables))
    return drafts.T, jnp.swapaxes(probabilities, 0, 1), cache


@partial(jax.jit, static_argnames=("family", "cfg", "plan"), donate_argnames=("cache",), compiler_options=STEP_COMPILER_OPTIONS)
def feed(weights, cache, tokens, positions, tables, *, family, cfg, plan=None):
    """Tokens into the cache, nothing read out: what a draft model has not seen of its streams'
    text. tokens, positions int32 [rows, T] (position -1: nothing); tables: chunk_rope_tables of positions."""
    return forward(weights, cache, tokens, positions, tables, family=family, cfg=cfg, plan=plan)[1]


@jax.jit
def with_model_drafts(tokens, drafted, probabilities, drafting, draft_probabilities=None):
    """A verify call's tokens [rows, W] with a model's drafts [rows, W - 1] in the drafting rows
    (bool [rows]), and every row's draft distributions: the model's there; elsewhere those of an
    earlier model's drafts (draft_probabilities), or, without them, a point mass at each of the
    host's drafts."""
    if draft_probabilities is None:
        draft_probabilities = jax.nn.one_hot(tokens[:, 1:], probabilities.shape[-1], dtype=probabilities.dtype)
    tokens = tokens.at[:, 1:].set(jnp.where(drafting[:, None], drafted, tokens[:, 1:]))
    return tokens, jnp.where(drafting[:, None, None], probabilities, draft_probabilities)


# What a draft's keys are folded with (see draft).
_DRAFT_STREAM = 0x5EED


def _inverse_cdf(probabilities, uniforms):
    """The first token whose running probability passes uniforms [rows] in probabilities f32 [rows, V]."""
    cdf = jnp.cumsum(probabilities, axis=-1)
    return jnp.argmax(cdf > uniforms[:, None] * cdf[:, -1:], axis=-1).astype(jnp.int32)


@partial(
    jax.jit, static_argnames=("family", "cfg", "plan", "n_top"), donate_argnames=("cache", "state"),
    compiler_options=STEP_COMPILER_OPTIONS,
)
def verify(weights, cache, tokens, positions, tables, tensors, state, draft_probabilities=None, *, family, cfg, plan=None, n_top):
    """Score each row's last token and the drafts after it in one pass, and keep what the sampler agrees with.

    tokens, positions int32 [rows, W]: per row its last sampled token, then up to W - 1 drafted
    tokens (position -1 after a row's drafts; an idle row is all -1). The sampler runs at each of
    the W positions in turn, as W decode steps would, its state advancing as theirs would, so its
    token at position j is the one plain decoding would sample there given the drafts before j:
    a row keeps its drafts while they equal the sampler's tokens, then the sampler's next token
    (rz.speculative says why that is the speculative-sampling rule for a drafted token).

    draft_probabilities f32 [rows, W - 1, n_vocab]: the distribution q each draft was drawn from, for
    drafts of a model (rz.steps.draft); a one-hot row for a point-mass draft. With them, a draft d is
    kept with probability min(1, p(d)/q(d)), p being Sampler.probabilities, and the token after the
    kept ones is drawn from norm(max(p - q, 0)) at the first rejected draft, from p after the last
    draft: speculative sampling (Leviathan et al.). Without them (None), as above.

    tables: chunk_rope_tables of positions. Returns the SampledTokens at every position (leaves [W, rows, ...]), how many of them each row
    emits (int32 [rows], at least 1 for a live row), the cache, and the sampler state as it stands
    after each row's last emitted token. The cache holds only what was kept, as attention sees it.
    Rejected drafts stay in their slots as stale later positions, which causality hides until the
    tokens at those positions overwrite them (the cache already holds such slots when a row is
    reused); a sliding layer's ring holds the window and the whole verify chunk
    (kv_cache.table_lengths), so what the drafts overwrote there is outside every later query's window.
    """
    sampler = Sampler(n_top_logprobs=n_top)
    rows = tokens.shape[0]
    whole_state, state = state, jax.tree.map(lambda leaf: leaf[:rows], state)
    hidden, cache = forward(weights, cache, tokens, positions, tables, family=family, cfg=cfg, plan=plan)
    logits = lm_head(weights, hidden, family=family, cfg=cfg, plan=plan)

    if draft_probabilities is None:
        def one(state, logits_at):
            sampled, state = sampler(logits_at, tensors, state)
            return state, (sampled, state)

        _, (sampled, states) = jax.lax.scan(one, state, jnp.swapaxes(logits, 0, 1))
        # Draft j + 1 is kept while it, and every draft before it, is the token sampled at position j.
        kept = sampled.tokens[:-1].T == tokens[:, 1:]
    else:
        sampled, states, kept = _weigh_drafts(sampler, logits, tokens, positions, draft_probabilities, tensors, state)
    n_kept = jnp.sum(jnp.cumprod(kept & (positions[:, 1:] >= 0), axis=1), axis=1)
    n_emitted = jnp.where(positions[:, 0] >= 0, n_kept + 1, 0).astype(jnp.int32)
    last = jnp.maximum(n_emitted - 1, 0)
    state = jax.tree.map(lambda leaf: leaf[last, jnp.arange(rows)], states)
    state = jax.tree.map(lambda whole, part: whole.at[:rows].set(part), whole_state, state)
    return sampled, n_emitted, cache, state


def _weigh_drafts(sampler, logits, tokens, positions, draft_probabilities, tensors, state):
    """Speculative sampling over a verify call's logits [rows, W, V] (see verify): at each position,
    whether its draft is kept, and the token emitted there if it is the first not kept (the
    residual's draw), or the sampler's own where the row has no draft (after its last one).

    Returns the SampledTokens emitted at each position and the sampler state after each
    (leaves [W, rows, ...]), and which drafts are kept, bool [rows, W - 1]. The penalty window sees
    the emitted tokens, which are the drafts up to the first one rejected.
    """
    rows, width, vocab = logits.shape
    # Position j weighs draft j + 1 by q_j; the last position has no draft (its q is never read).
    drafts = jnp.concatenate([tokens[:, 1:], jnp.zeros((rows, 1), tokens.dtype)], axis=1)
    has_draft = jnp.concatenate([positions[:, 1:] >= 0, jnp.zeros((rows, 1), bool)], axis=1)
    q = jnp.concatenate([draft_probabilities, jnp.zeros((rows, 1, vocab), draft_probabilities.dtype)], axis=1)

    def one(state, at):
        logits_at, draft_at, has_draft_at, q_at = at
        p = sampler.probabilities(logits_at, tensors, state)
        own, next_state = sampler(logits_at, tensors, state)
        accept_key, residual_key = (jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys, n) for n in (1, 2))
        p_draft, q_draft = (jnp.take_along_axis(probs, draft_at[:, None], axis=1)[:, 0] for probs in (p, q_at))
        kept = jax.vmap(jax.random.uniform)(accept_key) * q_draft < p_draft
        residual = jnp.maximum(p - q_at, 0.0)
        # p == q leaves no residual, and rejects nothing.
        residual = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, residual, p)
        redrawn = _inverse_cdf(residual, jax.vmap(jax.random.uniform)(residual_key))
        emitted = jnp.where(has_draft_at, jnp.where(kept, draft_at, redrawn), own.tokens)
        recent = jnp.concatenate([state.recent_tokens[:, 1:], emitted[:, None]], axis=1)
        next_state = SamplerState(keys=next_state.keys, recent_tokens=recent)
        return next_state, (sampler.chosen(logits_at, emitted), next_state, kept)

    at = (jnp.swapaxes(logits, 0, 1), drafts.T, has_draft.T, jnp.swapaxes(q, 0, 1))
    _, (sampled, states, kept) = jax.lax.scan(one, state, at)
    return sampled, states, kept[:-1].T


ALL = (prefill, score, chunk_rope_tables, copy_blocks, join_row, first_token, decode, draft, feed, with_model_drafts, verify)


def compiled_variants() -> int:
    """How many shape variants of the compiled steps this process holds: constant once a session is warm."""
    return sum(step._cache_size() for step in ALL)
