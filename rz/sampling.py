"""Choosing the next token on device: llama.cpp's default sampler chain, batched with per-row settings.

The chain is the one llama.cpp's `common_sampler` and llama-cpp-python's `Llama._init_sampler`
build by default, in the same order and with the same semantics:

    logit bias -> penalties -> top-k -> top-p -> min-p -> temperature -> dist

  * logit bias adds each row's per-token biases (OpenAI's and llama-server's `logit_bias`) to the
    logits, first, as llama.cpp's chain (its logit-bias sampler leads) and vLLM (before its
    penalties) do; a bias of -inf bans the token;
  * penalties (repeat, frequency, presence) over the last `penalty_last_n` tokens of the
    history the engine hands over: the generated tokens only, as in llama-cpp-python (a fresh
    sampler per request), or the prompt too, as llama.cpp's server feeds it into its sampler;
  * top-k keeps the k highest logits (0 = off);
  * top-p keeps the shortest prefix of the sorted candidates whose probability mass reaches p,
    the probabilities being the softmax of the candidates that top-k left, at temperature 1;
  * min-p keeps the tokens whose probability is at least min_p times the highest one;
  * temperature divides the surviving logits; temperature 0 is greedy, the argmax of the
    penalized logits with ties going to the lowest id (llama.cpp's greedy sampler);
  * dist draws one token from the softmax of what is left, with one uniform number per row.

The defaults of `SamplingParams` are llama.cpp's (`common_params_sampling`), which are also
llama-cpp-python's `create_completion` defaults: temperature 0.8, top_k 40, top_p 0.95,
min_p 0.05, repeat_penalty 1.0 (off), penalty_last_n 64.

Everything on device is a fixed-shape function of [B]-shaped parameter arrays, so one compiled
decode step serves a batch whose rows all ask for different settings. Each row has its own PRNG
key, and every operation is row-wise, so a row's tokens depend only on its own logits, settings
and seed, never on which other requests share the batch.

Sorting a 262,144-token vocabulary every step would cost more than the rest of the sampler, so
top-k, top-p and min-p run on the `candidate_count` best logits (`lax.top_k`). Whether that
frame holds the whole truncated set is checked per row; a row whose set does not fit is redone
exactly: over the unsorted vocabulary when only min-p truncates (no sort needed), else over a
full sort. Both redos sit behind `lax.cond`, so they cost nothing in steps that need neither.
On CPU, with rz's C++ kernels built, the truncation, the redos and the draw are one kernel call
taking the same steps (rz_kernels.sample_draw): in XLA they are several hundred instructions in
every compiled step that samples, which each executable keeps resident.
The kept set is always llama.cpp's (up to float rounding, and the order among equal logits,
which llama.cpp leaves unspecified too); only the speed depends on the settings.
"""

import secrets
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rz.host_memory import device_copy
from rz_kernels import sample_draw
from rz.request import MAX_LOGIT_BIAS, MAX_N_LOGPROBS, MAX_PENALTY_LAST_N, SamplingParams

__all__ = [
    "MAX_N_LOGPROBS", "MAX_PENALTY_LAST_N", "SampledTokens", "Sampler", "SamplerState", "SamplingParams", "SamplingTensors",
    "apply_logit_bias", "apply_token_mask",
]

# How many of the best logits top-k, top-p and min-p look at first (see above); llama.cpp's own
# top-p code starts from a partial sort of 256 candidates too.
DEFAULT_CANDIDATE_COUNT = 256
_INT32_MAX = 2**31 - 1


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplingTensors:
    """The settings of every row of a batch, each field shaped [B] (the biases [B, MAX_LOGIT_BIAS]); built
    on the host once per batch.

    Every row's biases are padded to the same width, whatever it asks for, so that one compiled step
    serves biased and unbiased batches alike.
    """

    temperature: jax.Array  # f32[B]
    top_k: jax.Array  # i32[B]
    top_p: jax.Array  # f32[B]
    min_p: jax.Array  # f32[B]
    repeat_penalty: jax.Array  # f32[B]
    presence_penalty: jax.Array  # f32[B]
    frequency_penalty: jax.Array  # f32[B]
    penalty_last_n: jax.Array  # i32[B]
    bias_ids: jax.Array  # i32[B, MAX_LOGIT_BIAS]: the biased tokens, -1 where empty
    bias_values: jax.Array  # f32[B, MAX_LOGIT_BIAS]: their biases, 0 where empty

    @classmethod
    def from_params(cls, rows: Sequence[SamplingParams]) -> "SamplingTensors":
        """Stack validated per-request settings; pad idle rows with SamplingParams(temperature=0)."""
        for params in rows:
            params.validate()

        def column(name, dtype):
            return device_copy([getattr(p, name) for p in rows], dtype)

        bias_ids = np.full((len(rows), MAX_LOGIT_BIAS), -1, np.int32)
        bias_values = np.zeros((len(rows), MAX_LOGIT_BIAS), np.float32)
        for row, params in enumerate(rows):
            for column_index, (token, bias) in enumerate(params.logit_bias):
                bias_ids[row, column_index], bias_values[row, column_index] = token, bias

        return cls(
            temperature=column("temperature", np.float32),
            top_k=device_copy([min(p.top_k, _INT32_MAX) for p in rows], np.int32),
            top_p=column("top_p", np.float32),
            min_p=column("min_p", np.float32),
            repeat_penalty=column("repeat_penalty", np.float32),
            presence_penalty=column("presence_penalty", np.float32),
            frequency_penalty=column("frequency_penalty", np.float32),
            penalty_last_n=column("penalty_last_n", np.int32),
            bias_ids=device_copy(bias_ids),
            bias_values=device_copy(bias_values),
        )


# Jitted once: the eager vmap would trace and compile again after each drop of JAX's tracing
# caches (rz.host_memory.drop_tracing_caches), that is, on the first request after a step compiles.
_keys_from_seeds = jax.jit(jax.vmap(jax.random.key))


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SamplerState:
    """What the sampler carries from one step to the next, per row."""

    keys: jax.Array  # key[B]: typed PRNG keys, one stream per row
    recent_tokens: jax.Array  # i32[B, W]: the last W context tokens, newest last, -1 where empty

    @classmethod
    def create(
        cls,
        rows: Sequence[SamplingParams],
        histories: Sequence[Sequence[int]],
        window: int = MAX_PENALTY_LAST_N,
    ) -> "SamplerState":
        """Fresh state for a batch: each row seeded from its params, its window filled from its history."""
        if window < 1:
            raise ValueError(f"the penalty window must hold at least one token, got {window}")
        if len(rows) != len(histories):
            raise ValueError(f"{len(rows)} rows of params but {len(histories)} histories")
        seeds = device_copy([_resolve_seed(p) for p in rows], np.uint32)
        windows = np.stack([_window_of(history, window) for history in histories])
        return cls(keys=_keys_from_seeds(seeds), recent_tokens=device_copy(windows))

    def with_row(self, row: int, joining: "SamplerState") -> "SamplerState":
        """This state with row `row` replaced by a one-row state's (a request joining its slot)."""
        return jax.tree.map(lambda whole, part: whole.at[row].set(part[0]), self, joining)


def _resolve_seed(params: SamplingParams) -> int:
    return secrets.randbits(32) if params.seed is None else params.seed


def _window_of(history: Sequence[int], window: int) -> np.ndarray:
    """The last `window` tokens of a history, left-padded with -1."""
    tail = np.asarray(history, dtype=np.int32).reshape(-1)[-window:]
    return np.concatenate([np.full(window - len(tail), -1, np.int32), tail])


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class SampledTokens:
    """One step's choices and their log-probabilities under the raw model distribution."""

    tokens: jax.Array  # i32[B]
    logprobs: jax.Array  # f32[B]: log_softmax(raw logits) at the chosen token; zeros when n_top_logprobs is 0
    top_ids: jax.Array  # i32[B, n_top_logprobs]: the most likely tokens, best first
    top_logprobs: jax.Array  # f32[B, n_top_logprobs]


@dataclass(frozen=True)
class Sampler:
    """llama.cpp's default chain as a pure batched step: (logits, settings, state) -> (tokens, state).

    Log-probabilities follow llama-cpp-python's `logprobs` and llama.cpp's `n_probs` (without
    post_sampling_probs): the log-softmax of the model's raw logits, before logit bias, penalties,
    truncation and temperature. The engine slices top_ids/top_logprobs to each row's
    n_logprobs; n_top_logprobs is the batch's maximum, a static width.
    """

    n_top_logprobs: int = 0
    candidate_count: int = DEFAULT_CANDIDATE_COUNT
    # The draw as the C++ CPU kernel where it is built (rz_kernels.sample_draw); False: XLA's ops
    # on every backend, the reference the kernel is tested against.
    cpu_kernel: bool = True

    def __post_init__(self):
        if not 0 <= self.n_top_logprobs <= MAX_N_LOGPROBS:
            raise ValueError(f"n_top_logprobs must be in [0, {MAX_N_LOGPROBS}], got {self.n_top_logprobs}")
        if self.candidate_count < 1:
            raise ValueError(f"candidate_count must be >= 1, got {self.candidate_count}")

    def __call__(
        self, logits: jax.Array, params: SamplingTensors, state: SamplerState, allowed: jax.Array | None = None,
        logprobs: jax.Array | None = None,
    ) -> tuple[SampledTokens, SamplerState]:
        """logits f32[B, V] -> the chosen tokens, and the state with them appended to the history.

        allowed: i32[B, ceil(V/32)], a bitmask of the tokens each row may choose (structured
        output, rz.constraints); None allows every token.
        logprobs: a bool scalar, whether to compute the log-probabilities at all (see chosen).
        """
        with jax.named_scope("sampler"):
            logits = logits.astype(jnp.float32)
            penalized = _penalized(logits, params, state, allowed)
            greedy = first_argmax(penalized)
            sampling = params.temperature > 0

            def draw():
                # A row's key advances at every step in which it samples (and so whenever the
                # batch draws): its tokens depend on its seed only, not on its neighbours.
                split = jax.vmap(jax.random.split)(state.keys)
                uniforms = jax.vmap(jax.random.uniform)(split[:, 1])
                return jnp.where(sampling, self._draw(penalized, params, uniforms), greedy), split[:, 0]

            # An all-greedy batch (the common case when matching llama.cpp) skips the draw.
            tokens, next_keys = jax.lax.cond(jnp.any(sampling), draw, lambda: (greedy, state.keys))
            sampled = self.chosen(logits, tokens, logprobs)
            recent = jnp.concatenate([state.recent_tokens[:, 1:], tokens[:, None]], axis=1)
            return sampled, SamplerState(keys=next_keys, recent_tokens=recent)

    def chosen(self, logits: jax.Array, tokens: jax.Array, logprobs: jax.Array | None = None) -> SampledTokens:
        """Tokens i32[B] chosen at raw logits f32[B, V], with their log-probabilities (see the class).

        logprobs: a bool scalar; where it is false the log-probabilities are zeros of the same
        shapes, and the pass over the vocabulary is skipped at run time. One compiled step then
        serves requests with and without log-probabilities (None: always computed).
        """
        logits = logits.astype(jnp.float32)
        if logprobs is None or not self.n_top_logprobs:
            return _with_logprobs(logits, tokens, self.n_top_logprobs)
        return jax.lax.cond(
            logprobs, lambda: _with_logprobs(logits, tokens, self.n_top_logprobs), lambda: _no_logprobs(tokens, self.n_top_logprobs)
        )

    def probabilities(self, logits: jax.Array, params: SamplingTensors, state: SamplerState) -> jax.Array:
        """The distribution __call__ draws each row's token from, f32[B, V]: the softmax at the
        row's temperature of what bias, penalties and truncation leave; one-hot at the greedy
        token for a greedy row. Speculative sampling weighs drafts by it (rz.speculative)."""
        with jax.named_scope("sampler_probabilities"):
            penalized = _penalized(logits.astype(jnp.float32), params, state, None)
            batch, vocab_size = penalized.shape
            rows = jnp.arange(batch)[:, None]
            full_lse = jax.nn.logsumexp(penalized, axis=-1)
            candidate_logits, candidate_ids = _top_k(penalized, min(self.candidate_count, vocab_size))
            keep_count, resolved = _truncation(candidate_logits, full_lse, params, vocab_size)
            framed = _kept_weights(candidate_logits, _prefix_mask(keep_count, candidate_logits), params)
            weights = jnp.zeros_like(penalized).at[rows, candidate_ids].set(framed)
            sampling = params.temperature > 0

            # The rows whose kept set reaches beyond the frame, over the whole vocabulary (as _draw redoes them).
            def redo(weights):
                sorted_logits, sorted_ids = jax.lax.top_k(penalized, vocab_size)
                keep_all, _ = _truncation(sorted_logits, full_lse, params, vocab_size)
                redone = _kept_weights(sorted_logits, _prefix_mask(keep_all, sorted_logits), params)
                return jnp.where((sampling & ~resolved)[:, None], jnp.zeros_like(weights).at[rows, sorted_ids].set(redone), weights)

            weights = jax.lax.cond(jnp.any(sampling & ~resolved), redo, lambda w: w, weights)
            greedy = jax.nn.one_hot(first_argmax(penalized), vocab_size, dtype=jnp.float32)
            return jnp.where(sampling[:, None], weights / jnp.sum(weights, axis=-1, keepdims=True), greedy)


    def _draw(self, penalized: jax.Array, params: SamplingTensors, uniforms: jax.Array) -> jax.Array:
        """Truncate and draw for every row, using the cheapest frame that is exact for that row:
        on CPU one C++ kernel call where the kernels are built (rz_kernels.sample_draw), else
        XLA's ops (_draw_xla, the reference)."""
        vocab_size = penalized.shape[-1]
        full_lse = jax.nn.logsumexp(penalized, axis=-1)
        candidate_logits, candidate_ids = _top_k(penalized, min(self.candidate_count, vocab_size))
        operands = (penalized, candidate_logits, candidate_ids, full_lse, params.temperature, params.top_k, params.top_p, params.min_p, uniforms)
        if not (self.cpu_kernel and sample_draw.available()):
            return _draw_xla(*operands)
        return jax.lax.platform_dependent(*operands, cpu=sample_draw.draw_cpu, default=_draw_xla)


def _draw_xla(penalized, candidate_logits, candidate_ids, full_lse, temperature, top_k, top_p, min_p, uniforms) -> jax.Array:
    """Sampler._draw in XLA's ops: the candidate frame's cut where it holds a row's kept set; the
    rows it does not hold redone exactly, behind lax.cond (see the module's docstring)."""
    vocab_size = penalized.shape[-1]
    params = _Truncating(temperature, top_k, top_p, min_p)
    keep_count, resolved = _truncation(candidate_logits, full_lse, params, vocab_size)
    kept = _prefix_mask(keep_count, candidate_logits)
    tokens = _inverse_cdf_draw(candidate_logits, candidate_ids, kept, params, uniforms)

    sampling = temperature > 0
    top_k_off = (top_k <= 0) | (top_k >= vocab_size)
    # Without top-k and top-p, only min-p truncates, and min-p needs no order.
    min_p_only = sampling & ~resolved & top_k_off & (top_p >= 1)
    needs_sort = sampling & ~resolved & ~min_p_only

    def redo_unsorted(tokens):
        threshold = jnp.max(penalized, axis=-1, keepdims=True) + jnp.log(min_p)[:, None]
        ids = jnp.broadcast_to(jnp.arange(vocab_size, dtype=jnp.int32), penalized.shape)
        redone = _inverse_cdf_draw(penalized, ids, penalized >= threshold, params, uniforms)
        return jnp.where(min_p_only, redone, tokens)

    def redo_sorted(tokens):
        sorted_logits, sorted_ids = jax.lax.top_k(penalized, vocab_size)
        keep_all, _ = _truncation(sorted_logits, full_lse, params, vocab_size)
        kept_sorted = _prefix_mask(keep_all, sorted_logits)
        redone = _inverse_cdf_draw(sorted_logits, sorted_ids, kept_sorted, params, uniforms)
        return jnp.where(needs_sort, redone, tokens)

    tokens = jax.lax.cond(jnp.any(min_p_only), redo_unsorted, lambda t: t, tokens)
    return jax.lax.cond(jnp.any(needs_sort), redo_sorted, lambda t: t, tokens)


@dataclass(frozen=True)
class _Truncating:
    """The settings truncation and the draw read (a SamplingTensors' columns)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array


def _penalized(logits: jax.Array, params: SamplingTensors, state: SamplerState, allowed: jax.Array | None) -> jax.Array:
    """The logits after bias, penalties and the token mask: what greedy picks from and truncation cuts."""
    # Each pass over the vocabulary costs (8 rows of Gemma's 262,144 logits are 8 MiB): a batch
    # that asks for no bias, no penalty, no mask, or no draw, skips that work. The skips are
    # exact: biases, penalties and masks that are off leave every logit as it is, and a greedy row
    # ignores its key. The mask comes with the bias, behind one branch, before the penalties: a
    # masked logit is -inf, which penalties leave -inf.
    def bias_and_mask():
        biased = apply_logit_bias(logits, params.bias_ids, params.bias_values)
        return biased if allowed is None else apply_token_mask(biased, allowed)

    adjusting = jnp.any(params.bias_ids >= 0)
    if allowed is not None:
        adjusting |= jnp.any(allowed != -1)  # a batch without a constrained row has all ones
    biased = jax.lax.cond(adjusting, bias_and_mask, lambda: logits)
    penalties_on = (params.penalty_last_n > 0) & (
        (params.repeat_penalty != 1) | (params.frequency_penalty != 0) | (params.presence_penalty != 0)
    )
    return jax.lax.cond(
        jnp.any(penalties_on),
        lambda: apply_penalties(biased, state.recent_tokens, params),
        lambda: biased,
    )


# first_argmax reads the vocabulary in tiles of this many logits.
_ARGMAX_TILE = 128


def first_argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax(logits, axis=-1) (ties to the lowest id) as int32, in the passes a CPU runs fast.

    XLA's argmax is a reduction over (value, index) pairs that the CPU backend does not
    vectorize: 2.4 ms for 8 rows of 262,144 logits, against 0.3 ms for a plain max. So: the max
    of each tile, the first tile that holds the row's max, and the first max within that tile;
    the first tile holding the max holds its first occurrence.
    """
    batch, vocab = logits.shape
    if vocab <= _ARGMAX_TILE:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    padded = -(-vocab // _ARGMAX_TILE) * _ARGMAX_TILE
    if padded != vocab:
        logits = jnp.pad(logits, ((0, 0), (0, padded - vocab)), constant_values=-jnp.inf)
    tiles = logits.reshape(batch, padded // _ARGMAX_TILE, _ARGMAX_TILE)
    tile = jnp.argmax(jnp.max(tiles, axis=-1), axis=-1)
    within = jnp.argmax(jnp.take_along_axis(tiles, tile[:, None, None], axis=1)[:, 0], axis=-1)
    return (tile * _ARGMAX_TILE + within).astype(jnp.int32)


def apply_token_mask(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """logits f32[B, V] with every token whose bit is clear in allowed i32[B, ceil(V/32)] set to -inf.

    Bit i of word w stands for token 32*w + i (llguidance's layout). A row whose words are all ones
    is left as it is, so constrained and unconstrained requests share one batch.
    """
    batch, vocab = logits.shape
    bits = (allowed[:, :, None] >> jnp.arange(32, dtype=allowed.dtype)) & 1
    return jnp.where(bits.reshape(batch, -1)[:, :vocab] != 0, logits, -jnp.inf)


def apply_logit_bias(logits: jax.Array, bias_ids: jax.Array, bias_values: jax.Array) -> jax.Array:
    """logits f32[B, V] with bias_values f32[B, K] added at bias_ids i32[B, K] (-1: no token) -> f32[B, V]."""
    batch, vocab_size = logits.shape
    # Empty entries point past the vocabulary, where the scatter drops them.
    target = jnp.where(bias_ids >= 0, bias_ids, vocab_size)
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], target.shape)
    return logits.at[rows, target].add(bias_values, mode="drop")


def apply_penalties(logits: jax.Array, recent_tokens: jax.Array, params: SamplingTensors) -> jax.Array:
    """llama.cpp's penalties: logits f32[B, V], recent_tokens i32[B, W] (newest last, -1 empty) -> f32[B, V].

    For each distinct token among a row's last penalty_last_n, seen `count` times:
    logit * repeat if logit <= 0 else logit / repeat, then - count * frequency - presence.
    """
    batch, window = recent_tokens.shape
    vocab_size = logits.shape[-1]
    position = jnp.arange(window)[None, :]
    counted = (recent_tokens >= 0) & (position >= window - params.penalty_last_n[:, None])
    # Counting by pairwise comparison costs B*W*W, far less than a [B, V] histogram.
    same_token = (recent_tokens[:, :, None] == recent_tokens[:, None, :]) & counted[:, None, :]
    counts = jnp.sum(same_token, axis=-1).astype(jnp.float32)
    # Uncounted slots point past the vocabulary, where the scatter drops them. A token seen
    # several times is written several times, always with the same value.
    target = jnp.where(counted, recent_tokens, vocab_size)
    current = jnp.take_along_axis(logits, jnp.minimum(target, vocab_size - 1), axis=-1)
    repeat = params.repeat_penalty[:, None]
    penalized = jnp.where(current <= 0, current * repeat, current / repeat)
    penalized = penalized - (counts * params.frequency_penalty[:, None] + params.presence_penalty[:, None])
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], target.shape)
    return logits.at[rows, target].set(penalized, mode="drop")


def _truncation(
    sorted_logits: jax.Array, full_lse: jax.Array, params: SamplingTensors, vocab_size: int
) -> tuple[jax.Array, jax.Array]:
    """How many of the sorted candidates top-k, top-p and min-p keep, and whether that is exact.

    sorted_logits f32[B, W] are the W best penalized logits, descending; full_lse f32[B] is the
    log-sum-exp over the whole vocabulary. Returns keep_count i32[B] and resolved bool[B]: False
    where the kept set may reach beyond these W candidates.
    """
    width = sorted_logits.shape[-1]
    position = jnp.arange(width)[None, :]
    k = jnp.where((params.top_k <= 0) | (params.top_k >= vocab_size), vocab_size, params.top_k)
    in_top_k = position < k[:, None]
    top_k_keep = jnp.minimum(k, width)

    # top-p measures mass under the softmax of what top-k left: the top k when they lie inside
    # this frame, the whole vocabulary when top-k is off.
    top_k_lse = jax.nn.logsumexp(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
    norm = jnp.where(k <= width, top_k_lse, full_lse)
    mass = jnp.cumsum(jnp.where(in_top_k, jnp.exp(sorted_logits - norm[:, None]), 0.0), axis=-1)
    reached = (mass >= params.top_p[:, None]) & in_top_k
    top_p_keep = jnp.where(
        (params.top_p < 1) & jnp.any(reached, axis=-1), jnp.argmax(reached, axis=-1) + 1, width
    )

    threshold = sorted_logits[:, 0] + jnp.log(params.min_p)
    min_p_keep = jnp.where(params.min_p > 0, jnp.sum(sorted_logits >= threshold[:, None], axis=-1), width)

    keep_count = jnp.minimum(jnp.minimum(top_k_keep, top_p_keep), min_p_keep).astype(jnp.int32)
    # A cut inside the frame is exact unless top-p's normalizer (a top-k set larger than the
    # frame, yet not the whole vocabulary) was out of sight.
    norm_known = (k <= width) | (k >= vocab_size) | (params.top_p >= 1)
    resolved = (k <= width) | ((keep_count < width) & norm_known)
    return keep_count, resolved


def _top_k(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k, kept a top-k: values f32[B, V] -> (f32[B, k], i32[B, k]), best first, ties to the lowest id.

    XLA lowers top_k to sort + slice and turns that back into its fast TopK only when every
    user slices the same width; reading a single column ([:, 0]) folds into a second slice of
    the sort and leaves a full sort of the vocabulary (measured: 0.4 s instead of 5 ms on CPU
    for 4 x 262,144). The barriers keep the users away from the sort. One barrier per output, not
    one over the pair: XLA:CPU's TopkDecomposer aborts on a barrier over the pair in a program
    that spans several devices (a tensor-parallel step, rz.sharding).
    """
    top_values, top_ids = jax.lax.top_k(values, k)
    return jax.lax.optimization_barrier(top_values), jax.lax.optimization_barrier(top_ids)


def _prefix_mask(keep_count: jax.Array, sorted_logits: jax.Array) -> jax.Array:
    return jnp.arange(sorted_logits.shape[-1])[None, :] < keep_count[:, None]


def _inverse_cdf_draw(
    frame_logits: jax.Array, frame_ids: jax.Array, kept: jax.Array, params: SamplingTensors, uniforms: jax.Array
) -> jax.Array:
    """llama.cpp's dist: the first kept candidate whose running mass reaches u times the total.

    frame_logits f32[B, W], frame_ids i32[B, W], kept bool[B, W] (at least the maximum is kept),
    uniforms f32[B] in [0, 1) -> token ids i32[B].
    """
    cdf = jnp.cumsum(_kept_weights(frame_logits, kept, params), axis=-1)
    target = uniforms[:, None] * cdf[:, -1:]
    # u < 1, so the last kept candidate always qualifies; asking for `kept` too keeps u = 0
    # off a leading dropped candidate, whose running mass is also 0.
    index = jnp.argmax(kept & (cdf >= target), axis=-1)
    return jnp.take_along_axis(frame_ids, index[:, None], axis=-1)[:, 0].astype(jnp.int32)


def _kept_weights(frame_logits: jax.Array, kept: jax.Array, params: SamplingTensors) -> jax.Array:
    """Unnormalized probabilities f32[B, W] of the kept candidates at each row's temperature; 0 elsewhere."""
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)[:, None]
    top = jnp.max(jnp.where(kept, frame_logits, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(kept, jnp.exp((frame_logits - top) / temperature), 0.0)


def _no_logprobs(tokens: jax.Array, n_top: int) -> SampledTokens:
    """Tokens [B] with zeros for their log-probabilities and n_top best."""
    batch = tokens.shape[0]
    return SampledTokens(
        tokens=tokens,
        logprobs=jnp.zeros((batch,), jnp.float32),
        top_ids=jnp.zeros((batch, n_top), jnp.int32),
        top_logprobs=jnp.zeros((batch, n_top), jnp.float32),
    )


def _with_logprobs(raw_logits: jax.Array, tokens: jax.Array, n_top: int) -> SampledTokens:
    if not n_top:
        # Without top log-probabilities, skip a pass over the vocabulary per step (262,144
        # entries for Gemma 3).
        return _no_logprobs(tokens, 0)
    logprobs = jax.nn.log_softmax(raw_logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    top_logprobs, top_ids = _top_k(logprobs, n_top)
    return SampledTokens(
        tokens=tokens, logprobs=chosen, top_ids=top_ids.astype(jnp.int32), top_logprobs=top_logprobs
    )

