"""rz_kernels.causal_attention: the reference against a direct NumPy loop, and every implementation
(CPU chunked formulation, Pallas flash and decode kernels in interpret mode) against the reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rz_kernels import attention_kv, attention_pallas, cpu_ffi
from rz_kernels.attention_kv import CACHE_TYPES
from support.kernels import nmse
from rz_kernels.causal_attention import (
    attention,
    attention_cpu,
    attention_ref,
    attention_xla_chunked,
    decode_attention_cpu,
    prompt_attention_cpu,
    takes_bf16_values,
    takes_int16_scores,
)

# Pallas kernels run compiled on a GPU and in interpret mode elsewhere (CI's CPUs).
INTERPRET = jax.default_backend() != "gpu"


def assert_pallas_close(actual, expected) -> None:
    """Interpret mode repeats the reference's f32 arithmetic; compiled on a GPU the dots run on
    tensor cores (TF32), so there the bound is llama.cpp's NMSE <= 5e-4 (measured ~1e-7 on an H200)."""
    if INTERPRET:
        np.testing.assert_allclose(actual, expected, atol=1e-5)
    else:
        assert nmse(actual, expected) <= 5e-4

# (batch, query heads, KV heads, queries, key slots, head dim, window, softcap): Gemma-like
# (4:1 grouping, sliding window) and SmolLM2-like (9:3) shapes, odd lengths, a decode step.
CASES = [
    (2, 4, 1, 37, 100, 64, 0, 0.0),
    (1, 9, 3, 20, 70, 64, 16, 30.0),
    (2, 4, 1, 1, 90, 32, 0, 0.0),
    (3, 6, 2, 3, 130, 16, 40, 0.0),
]


def make_inputs(seed, batch, n_head, n_kv, length, n_keys, head_dim):
    """Queries for the last `length` positions; key slots holding every position up to them in a
    shuffled (ring-buffer) order with a few empty; the last query of the last sequence is padding."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, n_head, length, head_dim)).astype(np.float32)
    k = rng.standard_normal((batch, n_kv, n_keys, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, n_kv, n_keys, head_dim)).astype(np.float32)
    first = 7
    q_positions = np.tile(np.arange(first + n_keys - length, first + n_keys), (batch, 1)).astype(np.int32)
    k_positions = np.tile(np.arange(first, first + n_keys), (batch, 1)).astype(np.int32)
    for row in k_positions:
        rng.shuffle(row)
    k_positions[:, :3] = -1
    q_positions[-1, -1] = -1
    return q, k, v, q_positions, k_positions


def numpy_attention(q, k, v, q_positions, k_positions, window, scale, softcap):
    batch, n_head, length, _ = q.shape
    group = n_head // k.shape[1]
    out = np.zeros((batch, n_head, length, v.shape[-1]))
    for b in range(batch):
        for h in range(n_head):
            for t in range(length):
                p = q_positions[b, t]
                seen = [s for s, kp in enumerate(k_positions[b]) if 0 <= kp <= p and (not window or kp > p - window)]
                if not seen:
                    continue
                scores = np.array([q[b, h, t] @ k[b, h // group, s] for s in seen], np.float64) * scale
                if softcap:
                    scores = softcap * np.tanh(scores / softcap)
                weights = np.exp(scores - scores.max())
                out[b, h, t] = weights @ v[b, h // group, seen] / weights.sum()
    return out


def options(head_dim, window, softcap):
    return {"window": window, "scale": head_dim**-0.5, "softcap": softcap}


@pytest.mark.parametrize("case", CASES[:2])
def test_reference_matches_numpy(case):
    *shape, window, softcap = case
    inputs = make_inputs(0, *shape)
    expected = numpy_attention(*inputs, **options(shape[-1], window, softcap))
    actual = attention_ref(*map(jnp.asarray, inputs), **options(shape[-1], window, softcap))
    np.testing.assert_allclose(actual, expected, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(actual)[-1, :, -1], 0)  # the padding query


def test_reference_matches_the_model_attention_maps():
    """The attention maps the model shows (rz_kernels.attention_weights, what rz.models.attention_probs
    returns) are the weights attention_ref applies: weights @ V gives its output for every real query."""
    from rz_kernels import attention_weights

    q, k, v, q_positions, k_positions = make_inputs(1, 2, 4, 1, 9, 40, 32)
    weights = attention_weights(*map(jnp.asarray, (q, k, q_positions, k_positions)), window=8, scale=0.25)  # [B, H, T, S]
    group = q.shape[1] // k.shape[1]
    from_maps = np.einsum("bhts,bhsd->bhtd", np.asarray(weights), np.repeat(v, group, axis=1))
    ours = np.asarray(attention_ref(*map(jnp.asarray, (q, k, v, q_positions, k_positions)), window=8, scale=0.25))
    real = q_positions >= 0
    np.testing.assert_allclose(ours.transpose(0, 2, 1, 3)[real], from_maps.transpose(0, 2, 1, 3)[real], atol=1e-5)


# K and V cache types: each alike, and two mixed pairs.
TYPE_PAIRS = [(t, t) for t in CACHE_TYPES] + [("q8_0", "f16"), ("bf16", "q8_0")]


def stored(inputs, k_type, v_type):
    """make_inputs' arrays with K and V stored as the given cache types."""
    q, k, v, q_positions, k_positions = (jnp.asarray(a) for a in inputs)
    return q, attention_kv.store(k, k_type), attention_kv.store(v, v_type), q_positions, k_positions


@pytest.mark.parametrize("k_type, v_type", TYPE_PAIRS)
def test_every_implementation_reads_each_cache_type(k_type, v_type):
    """The reference computes on the stored values (as f32); the CPU formulation and both Pallas
    kernels read the same stored K and V and agree with it."""
    inputs = stored(make_inputs(5, 1, 4, 2, 5, 40, 32), k_type, v_type)
    expected = attention_ref(*inputs, window=0, scale=0.25)
    assert expected.dtype == jnp.float32
    exact = [jnp.asarray(a) for a in make_inputs(5, 1, 4, 2, 5, 40, 32)]
    exact[1], exact[2] = attention_kv.to_f32(inputs[1]), attention_kv.to_f32(inputs[2])
    np.testing.assert_allclose(expected, attention_ref(*exact, window=0, scale=0.25), atol=1e-6)
    if INTERPRET:  # the CPU formulation, on a CPU
        np.testing.assert_allclose(attention_cpu(*inputs, scale=0.25), expected, atol=1e-5)
    decode = attention_pallas.decode_attention(*inputs, scale=0.25, block_k=16, split_k=2, interpret=INTERPRET)
    assert_pallas_close(decode, expected)
    flash = attention_pallas.flash_attention(*inputs, scale=0.25, block_q=16, block_k=16, interpret=INTERPRET)
    assert_pallas_close(flash, expected)


def test_q8_0_stores_as_ggml():
    """q8_0 keeps one f16 scale per 32 values, max|x| / 127 (ggml's quantize_row_q8_0), and each value
    within half a step of it, plus the scale's f16 rounding times 127 (2**-11 * 127 steps); a block
    of zeros stays zero."""
    x = np.random.default_rng(9).standard_normal((3, 64)).astype(np.float32) * np.array([[0.01], [1.0], [30.0]], np.float32)
    x[0, :32] = 0.0
    rows = attention_kv.store(jnp.asarray(x), "q8_0")
    blocks = x.reshape(3, 2, 32)
    expected_scales = (np.abs(blocks).max(-1) / 127).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(rows.scales), expected_scales)
    step = np.repeat(expected_scales.astype(np.float32), 32, axis=1)
    assert np.all(np.abs(np.asarray(attention_kv.to_f32(rows)) - x) <= step * (0.5 + 127 * 2.0**-11) + 1e-12)
    assert not np.asarray(attention_kv.to_f32(rows))[0, :32].any()


def test_bad_cache_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="f32, f16, bf16, q8_0"):
        attention_kv.store(jnp.zeros((2, 32)), "q4_0")
    with pytest.raises(ValueError, match="multiples of 32"):
        attention_kv.empty("q8_0", (1, 1, 4, 24))


@pytest.mark.parametrize("case", CASES)
def test_cpu_formulation_matches_reference(case):
    *shape, window, softcap = case
    inputs = [jnp.asarray(a) for a in make_inputs(2, *shape)]
    expected = attention_ref(*inputs, **options(shape[-1], window, softcap))
    np.testing.assert_allclose(
        attention_xla_chunked(*inputs, chunk=16, **options(shape[-1], window, softcap)), expected, atol=1e-5
    )
    np.testing.assert_allclose(attention_cpu(*inputs, **options(shape[-1], window, softcap)), expected, atol=1e-5)
    np.testing.assert_allclose(attention(*inputs, **options(shape[-1], window, softcap)), expected, atol=1e-5)


@pytest.mark.parametrize("k_type, v_type", TYPE_PAIRS)
def test_cpu_decode_kernel(k_type, v_type, cpu_variant):
    """The C++ decode kernel: several sequence splits (S >= 512), softcap, window, each cache type;
    an odd number of query rows per KV head and head dims that are not multiples of 32 (phi2's 80)
    take the kernel's narrower value tiles (q8_0 needs multiples of 32, its block)."""
    odd_rows_80 = (2, 3, 1, 1, None, 80, 0, 0.0)
    odd_rows_24 = (1, 6, 2, 1, None, 24, 0, 0.0)
    odd_rows_96 = (2, 3, 1, 1, None, 96, 0, 0.0)
    quantized = "q8_0" in (k_type, v_type)
    cases = ((CASES[2], 700), (CASES[1], 600), (odd_rows_96, 90)) if quantized else ((CASES[2], 700), (CASES[1], 600), (odd_rows_80, 90), (odd_rows_24, 40))
    for case, n_keys in cases:
        batch, n_head, n_kv, length, _, head_dim, window, softcap = case
        inputs = stored(make_inputs(6, batch, n_head, n_kv, min(length, 4), n_keys, head_dim), k_type, v_type)
        opts = options(head_dim, window, softcap)
        np.testing.assert_allclose(decode_attention_cpu(*inputs, **opts, variant=cpu_variant), attention_ref(*inputs, **opts), atol=1e-5)


def test_cpu_decode_kernel_gives_each_step_the_bits_of_a_one_step_call_and_padding_zeros(cpu_variant):
    """A call of several steps (a verify step's, a short chunk's), over enough slots to split them:
    each step's rows get the bits a one-step (decode) call over the same slots gets, whatever rows
    sit beside them, and its padded steps (position -1) come out as zeros."""
    rng = np.random.default_rng(5)
    n_keys, steps, live = 1500, 8, 5
    q = jnp.asarray(rng.standard_normal((1, 9, steps, 64)), jnp.float32)
    k, v = (attention_kv.store(jnp.asarray(rng.standard_normal((1, 3, n_keys, 64)), jnp.float32), "f16") for _ in range(2))
    positions = np.full((1, steps), -1, np.int32)
    positions[0, :live] = np.arange(n_keys - live, n_keys)
    k_positions = jnp.asarray(np.arange(n_keys, dtype=np.int32)[None])

    def run(queries, q_positions):
        return np.asarray(decode_attention_cpu(queries, k, v, jnp.asarray(q_positions), k_positions, scale=0.125, variant=cpu_variant))

    out = run(q, positions)
    for step in range(live):
        np.testing.assert_array_equal(out[:, :, step : step + 1], run(q[:, :, step : step + 1], positions[:, step : step + 1]))
    assert not out[:, :, live:].any()
    np.testing.assert_allclose(out, attention_ref(q, k, v, jnp.asarray(positions), k_positions, scale=0.125), atol=1e-5)


def prompt_bound(bf16_values: bool, int16_scores: bool = False) -> float:
    """The prompt kernel's NMSE bound against the reference. f32 products repeat its sums up to
    rounding. int16 scores quantize each query row and key slot in steps of 1/5,792 of its
    largest element for a 64-wide head (1/2,896 for 256). bf16 values round the softmax's weights and V to bf16 (each within
    2**-9 relative). Both stay an order of magnitude under llama.cpp's 5e-4 for attention
    (benchmarks/results/chat-attention-session35.md)."""
    return 5e-5 if bf16_values else 1e-6 if int16_scores else 1e-10


def default_prompt_bound(k, v) -> float | None:
    """The prompt kernel's NMSE bound where its defaults take 16-bit products for this K and V
    (on this CPU, with its kernels), or None where every product is f32."""
    variant = cpu_ffi.selected()
    if variant is None or not (takes_bf16_values(v, variant) or takes_int16_scores(k, variant)):
        return None
    return prompt_bound(takes_bf16_values(v, variant), takes_int16_scores(k, variant))


def prompt_modes(variant) -> list[dict]:
    """The prompt kernel's product modes a variant runs on this CPU: f32 products; int16 scores
    where the build has AVX-512 VNNI; bf16 values where the CPU has AVX-512 BF16; both."""
    return [
        {"bf16_values": bf16, "int16_scores": int16}
        for bf16 in [False, True][: 1 + cpu_ffi.has_bf16_values(variant)]
        for int16 in [False, True][: 1 + cpu_ffi.has_int16_scores(variant)]
    ]


@pytest.mark.parametrize("k_type, v_type", TYPE_PAIRS)
def test_cpu_prompt_kernel(k_type, v_type, cpu_variant):
    """The C++ prompt kernel against the reference, in each of its product modes (prompt_modes):
    more query rows than a task's tile, softcap, window, shuffled (ring) slots and slots
    in order, a cache with rows past the batch, grouped heads with a partial last register tile (3
    query heads per KV head), and head dims that take a partial value pass (80, 48) or a wide one
    (256). A block of an odd number of slots leaves bf16 values a half-empty last pair. int16 scores
    take every K type, quantized after its conversion to f32."""
    quantized = "q8_0" in (k_type, v_type)
    cases = [  # batch, query heads, KV heads, queries, slots, head dim, window, softcap
        (2, 6, 2, 70, 150, 64, 0, 0.0),
        (1, 3, 1, 33, 90, 96 if quantized else 80, 40, 30.0),
        (1, 4, 1, 20, 64, 256, 0, 50.0),
        (1, 2, 2, 17, 40, 64 if quantized else 48, 16, 0.0),
    ]
    for case in cases:
        *shape, window, softcap = case
        inputs = stored(make_inputs(8, *shape), k_type, v_type)
        opts = options(shape[5], window, softcap)
        expected = attention_ref(*inputs, **opts)
        for mode in prompt_modes(cpu_variant):
            got = prompt_attention_cpu(*inputs, **opts, **mode, variant=cpu_variant)
            assert nmse(got, expected) < prompt_bound(**mode), (case, mode)
            # A cache holding a row past the batch: sequence b still reads row b.
            extra = jax.tree.map(lambda leaf: jnp.concatenate([leaf, leaf[:1]], axis=0), (inputs[1], inputs[2], inputs[4]))
            past = prompt_attention_cpu(inputs[0], extra[0], extra[1], inputs[3], extra[2], **opts, **mode, variant=cpu_variant)
            np.testing.assert_array_equal(past, got)


def test_cpu_prompt_kernel_takes_16_bit_products_for_a_16_bit_cache_where_the_cpu_has_them(cpu_variant):
    """The defaults: bf16 values for an f16 or bf16 V on a CPU with AVX-512 BF16, int16 scores for
    an f16 or bf16 K in an AVX-512 VNNI build; f32 products for an f32 cache (exact analysis),
    q8_0, and every CPU or build without them. Asking for either where it is missing is an error
    that says so."""
    has_bf16, has_int16 = cpu_ffi.has_bf16_values(cpu_variant), cpu_ffi.has_int16_scores(cpu_variant)
    for cache_type in CACHE_TYPES:
        stored_rows = attention_kv.store(jnp.zeros((1, 1, 32, 32), jnp.float32), cache_type)
        assert takes_bf16_values(stored_rows, cpu_variant) == (has_bf16 and cache_type in ("f16", "bf16")), cache_type
        assert takes_int16_scores(stored_rows, cpu_variant) == (has_int16 and cache_type in ("f16", "bf16")), cache_type
    inputs = stored(make_inputs(8, 1, 2, 1, 20, 40, 32), "f16", "f16")
    if not has_bf16:
        with pytest.raises(Exception, match="bf16 values need AVX-512 BF16"):
            jax.block_until_ready(prompt_attention_cpu(*inputs, scale=0.125, bf16_values=True, variant=cpu_variant))
    if not has_int16:
        with pytest.raises(Exception, match="int16 scores need an AVX-512 VNNI build"):
            jax.block_until_ready(prompt_attention_cpu(*inputs, scale=0.125, int16_scores=True, variant=cpu_variant))


def test_cpu_prompt_kernel_gives_each_query_the_same_bits_in_any_chunk(cpu_variant):
    """Slots in order, keys_in_order: a prompt's queries attended in one call or in two chunks (each
    over the history so far) get identical outputs, so reusing a cached prefix changes no bit."""
    rng = np.random.default_rng(3)
    n = 100
    q = jnp.asarray(rng.standard_normal((1, 6, n, 64)), jnp.float32)
    k, v = (attention_kv.store(jnp.asarray(rng.standard_normal((1, 2, 128, 64)), jnp.float32), "f16") for _ in range(2))
    positions = np.arange(n, dtype=np.int32)[None]
    k_positions = jnp.asarray(np.where(np.arange(128) < n, np.arange(128), -1).astype(np.int32)[None])

    for mode in prompt_modes(cpu_variant):

        def run(first, last):
            return prompt_attention_cpu(
                q[:, :, first:last], k, v, jnp.asarray(positions[:, first:last]), k_positions,
                scale=0.125, keys_in_order=True, **mode, variant=cpu_variant,
            )

        whole = run(0, n)
        np.testing.assert_array_equal(jnp.concatenate([run(0, 37), run(37, n)], axis=2), whole)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_cpu_prompt_kernel_int16_scores_do_not_overflow_at_their_largest(head_dim, cpu_variant):
    """Rows whose every element is their largest quantize to the integer limit everywhere, so
    each score is the largest sum of products int16 scores can take: it must fit its int32 lane
    (a wrapped sum would put the weight on the wrong slots)."""
    if not cpu_ffi.has_int16_scores(cpu_variant):
        pytest.skip(f"the {cpu_variant.name} build has no int16 scores")
    rng = np.random.default_rng(6)
    n = 48
    q = jnp.full((1, 2, 8, head_dim), 1.5, jnp.float32)
    signs = np.where(rng.random(n) < 0.5, -1.0, 1.0) * rng.uniform(0.05, 0.2, n)
    k = attention_kv.store(jnp.asarray(np.broadcast_to(signs[None, None, :, None], (1, 1, n, head_dim)), jnp.float32), "f16")
    v = attention_kv.store(jnp.asarray(rng.standard_normal((1, 1, n, head_dim)), jnp.float32), "f16")
    q_positions = jnp.asarray(np.arange(n - 8, n, dtype=np.int32)[None])
    k_positions = jnp.asarray(np.arange(n, dtype=np.int32)[None])
    got = prompt_attention_cpu(
        q, k, v, q_positions, k_positions, scale=head_dim**-0.5, keys_in_order=True, bf16_values=False, int16_scores=True, variant=cpu_variant
    )
    assert nmse(got, attention_ref(q, k, v, q_positions, k_positions, scale=head_dim**-0.5)) < prompt_bound(False, True)


def test_cpu_prompt_kernel_passes_a_nan_on_to_the_rows_that_see_it(cpu_variant):
    """A NaN in one key makes the rows of its KV head NaN, as the reference does, and no other
    head's: a softmax must not turn it into a weight of 0 and hide a broken model. In each product
    mode: int16 scores must not round the NaN away either."""
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((1, 3, 200, 64)).astype(np.float32)
    keys[0, 0, 10, 5] = np.nan
    q = jnp.asarray(rng.standard_normal((1, 9, 64, 64)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((1, 3, 200, 64)), jnp.float32)
    q_positions = jnp.asarray(np.arange(136, 200, dtype=np.int32)[None])
    k_positions = jnp.asarray(np.arange(200, dtype=np.int32)[None])
    for cache_type, mode in [("f32", {})] + [("f16", mode) for mode in prompt_modes(cpu_variant)]:
        k, v = attention_kv.store(jnp.asarray(keys), cache_type), attention_kv.store(values, cache_type)
        out = np.asarray(prompt_attention_cpu(q, k, v, q_positions, k_positions, scale=0.125, **mode, variant=cpu_variant))
        assert np.isnan(out[0, :3]).all() and not np.isnan(out[0, 3:]).any(), (cache_type, mode)


@pytest.mark.parametrize("case, blocks", [(CASES[0], (16, 32)), (CASES[1], (32, 16)), (CASES[3], (16, 64))])
def test_flash_attention_matches_reference(case, blocks):
    *shape, window, softcap = case
    inputs = [jnp.asarray(a) for a in make_inputs(3, *shape)]
    expected = attention_ref(*inputs, **options(shape[-1], window, softcap))
    block_q, block_k = blocks
    actual = attention_pallas.flash_attention(
        *inputs, block_q=block_q, block_k=block_k, interpret=INTERPRET, **options(shape[-1], window, softcap)
    )
    assert_pallas_close(actual, expected)


@pytest.mark.parametrize("case, block_k, split_k", [(CASES[2], 16, 3), (CASES[3], 32, 2), (CASES[1], 16, 1)])
def test_decode_attention_matches_reference(case, block_k, split_k):
    *shape, window, softcap = case
    inputs = [jnp.asarray(a) for a in make_inputs(4, *shape)]
    expected = attention_ref(*inputs, **options(shape[-1], window, softcap))
    actual = attention_pallas.decode_attention(
        *inputs, block_k=block_k, split_k=split_k, interpret=INTERPRET, **options(shape[-1], window, softcap)
    )
    assert_pallas_close(actual, expected)


def test_merge_splits_of_empty_and_full_splits():
    """A split that saw nothing (max -inf, sum 0) adds nothing; a row no split saw stays 0."""
    out = jnp.array([[[1.0], [0.0]], [[6.0], [0.0]]])  # [split=2, rows=2, Dv=1]
    running_max = jnp.array([[0.0, -jnp.inf], [jnp.log(2.0), -jnp.inf]])
    running_sum = jnp.array([[1.0, 0.0], [3.0, 0.0]])
    merged = attention_pallas.merge_splits(out, running_max, running_sum)
    np.testing.assert_allclose(merged, [[(1.0 + 2 * 6.0) / (1.0 + 2 * 3.0)], [0.0]], rtol=1e-6)


@pytest.mark.parametrize("paged", [False, True], ids=["slab", "pool"])
@pytest.mark.parametrize(
    "kernel, length", [(attention_pallas.flash_attention, 128), (attention_pallas.decode_attention, 1)]
)
def test_attention_kernels_lower_to_triton(kernel, length, paged):
    """Both kernels, on a slab and on a pool of 37 blocks of 64 slots read through a 16-entry table."""
    spec = jax.ShapeDtypeStruct
    kv = spec((37, 1, 64, 256), jnp.float16) if paged else spec((2, 1, 1024, 256), jnp.float32)
    args = (
        spec((2, 4, length, 256), jnp.float32),
        kv,
        kv,
        spec((2, length), jnp.int32),
        spec((37, 64) if paged else (2, 1024), jnp.int32),
        spec((2, 16), jnp.int32) if paged else None,
    )

    def run(q, k, v, q_positions, k_positions, block_table):
        return kernel(q, k, v, q_positions, k_positions, block_table=block_table, window=512, scale=0.0625, softcap=50.0)

    traced = jax.jit(run).trace(*args)
    assert "xla.gpu.triton" in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("first", [0, 200, 700])
def test_prompt_chunk_with_keys_in_order_reads_only_the_used_span(first):
    """A chunk of queries over a cache whose slot s holds position s (some later slots stale, from a
    longer sequence before): reading only the span up to the latest query gives the reference's result,
    for chunks whose span is the smallest, a middle and the whole cache."""
    rng = np.random.default_rng(first)
    n_keys, length = 1100, 300
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((1, 4, length, 64), (1, 2, n_keys, 64), (1, 2, n_keys, 64)))
    k_positions = np.full((1, n_keys), -1, np.int32)
    k_positions[0, : first + length] = np.arange(first + length)
    k_positions[0, first + length : first + length + 50] = np.arange(5000, 5050)
    q_positions = np.arange(first, first + length, dtype=np.int32)[None]
    q_positions[0, -3:] = -1
    inputs = (q, k, v, jnp.asarray(q_positions), jnp.asarray(k_positions))
    expected = attention_ref(*inputs, scale=0.125)
    np.testing.assert_allclose(attention_cpu(*inputs, scale=0.125, keys_in_order=True), expected, atol=1e-5)
    np.testing.assert_allclose(attention_xla_chunked(*inputs, scale=0.125, keys_in_order=True), expected, atol=1e-5)


# ----- a paged pool read through a block table: every implementation against the slab paged_as_slab gathers -----


def make_paged(seed, batch, n_head, n_kv, length, n_table, block_size, head_dim, *, in_order=False, extra_rows=0):
    """Queries, a pool and a block table [batch + extra_rows, n_table] over it.

    Each row's table names distinct pool blocks in a random order, some entries absent (-1); rows 0
    and 1 share a block (a shared prefix), and the pool holds blocks no row names, filled with NaN
    (which must not reach any result). in_order: entry j holds positions j * block_size on
    (keys_in_order's contract), the entries past the latest query absent; otherwise each row's
    blocks hold a shuffled run of positions with a few empty slots (a ring of blocks)."""
    rng = np.random.default_rng(seed)
    rows = batch + extra_rows
    n_pool = rows * n_table + 5
    table = rng.permutation(n_pool)[: rows * n_table].reshape(rows, n_table).astype(np.int32)
    if rows > 1:
        table[1, 0] = table[0, 0]
    positions = np.full((n_pool, block_size), -1, np.int32)
    n_slots = n_table * block_size
    # The latest query's position: in order, the last entry's block and half the one before are past it.
    last = n_slots - block_size - block_size // 2 - 1 if in_order else n_slots + 6
    for row in range(rows):
        logical = np.arange(n_slots) if in_order else rng.permutation(np.arange(last + 1 - n_slots, last + 1))
        logical = np.where(logical <= last, logical, -1)
        if not in_order:
            logical[rng.choice(n_slots, 3, replace=False)] = -1
        for entry, block in enumerate(table[row]):
            if row == 1 and entry == 0:
                continue  # row 0's block, as row 0 wrote it
            positions[block] = logical[entry * block_size : (entry + 1) * block_size]
    q_positions = np.tile(np.arange(last + 1 - length, last + 1), (batch, 1)).astype(np.int32)
    if in_order:  # the entries past the latest position hold nothing
        table[:, -(-(last + 1) // block_size) :] = -1
        table[batch - 1, 1] = -1  # and one before it: a hole
    else:
        table[batch - 1, rng.choice(n_table, max(1, n_table // 4), replace=False)] = -1
    q_positions[-1, -1] = -1  # a padding query
    unused = np.setdiff1d(np.arange(n_pool), table[table >= 0])
    q = rng.standard_normal((batch, n_head, length, head_dim)).astype(np.float32)
    k, v = (rng.standard_normal((n_pool, n_kv, block_size, head_dim)).astype(np.float32) for _ in range(2))
    return q, k, v, q_positions, positions, table, unused


def stored_paged(paged, k_type, v_type):
    """make_paged's arrays with K and V stored as the cache types, and the unused blocks' K and V
    garbage (NaN, or q8_0 scales NaN)."""
    q, k, v, q_positions, positions, table, unused = paged

    def garbage(leaf):
        value = jnp.nan if jnp.issubdtype(leaf.dtype, jnp.floating) else 77
        return leaf.at[unused].set(value)

    k, v = (jax.tree.map(garbage, attention_kv.store(jnp.asarray(x), t)) for x, t in ((k, k_type), (v, v_type)))
    return jnp.asarray(q), k, v, jnp.asarray(q_positions), jnp.asarray(positions), jnp.asarray(table)


def as_slab(inputs):
    """Paged inputs (q, pools, q positions, pool positions, table) as the slab inputs paged_as_slab gives."""
    q, k, v, q_positions, positions, table = inputs
    k, v, k_positions = attention_kv.paged_as_slab(k, v, positions, table[: q.shape[0]])
    return q, k, v, q_positions, k_positions


def paged_call(kernel, inputs, **options):
    q, k, v, q_positions, positions, table = inputs
    return kernel(q, k, v, q_positions, positions, block_table=table, **options)


def test_paged_as_slab_gathers_each_rows_blocks_in_table_order():
    """Slot i of row b is pool block table[b, i // block_size]'s slot i % block_size; an absent
    entry gives empty slots (position -1) with zero K and V, whatever the pool holds."""
    pool = jnp.arange(5 * 2 * 4 * 3, dtype=jnp.float32).reshape(5, 2, 4, 3)
    positions = jnp.arange(20, dtype=jnp.int32).reshape(5, 4)
    table = jnp.asarray([[3, -1, 0], [0, 4, 4]], jnp.int32)
    k, v, slab_positions = attention_kv.paged_as_slab(pool, pool, positions, table)
    expected = np.stack(
        [np.concatenate([np.asarray(pool[e]) if e >= 0 else np.zeros((2, 4, 3)) for e in row], axis=1) for row in np.asarray(table)]
    )
    np.testing.assert_array_equal(k, expected)
    np.testing.assert_array_equal(v, expected)
    np.testing.assert_array_equal(slab_positions, [[12, 13, 14, 15, -1, -1, -1, -1, 0, 1, 2, 3], [0, 1, 2, 3, 16, 17, 18, 19, 16, 17, 18, 19]])
    q8 = attention_kv.paged_as_slab(attention_kv.store(pool.reshape(5, 2, 4, 3)[..., :1].repeat(32, -1), "q8_0"), pool, positions, table)[0]
    assert isinstance(q8, attention_kv.Q8_0Rows) and q8.shape == (2, 2, 12, 32)
    assert not np.asarray(q8.quants)[0, :, 4:8].any() and not np.asarray(q8.scales)[0, :, 4:8].any()


# (batch, query heads, KV heads, queries, table entries, block size, head dim, window, softcap, in order)
PAGED_CASES = [
    (2, 9, 3, 1, 9, 16, 64, 0, 0.0, False),  # SmolLM2-like, a ring of 16-slot blocks
    (2, 4, 1, 3, 5, 32, 64, 24, 30.0, False),  # Gemma-like: window, softcap
    (1, 6, 2, 2, 40, 64, 32, 0, 0.0, True),  # 2,560 slots: several splits, keys in order
    (3, 4, 2, 1, 3, 128, 32, 100, 0.0, True),
]


@pytest.mark.parametrize("k_type, v_type", TYPE_PAIRS)
def test_cpu_decode_kernel_reads_a_pool_in_place_as_its_slab(k_type, v_type, cpu_variant):
    """The C++ decode kernel through a block table gives the bits it gives on the slab paged_as_slab
    gathers (and the reference's result): permuted and shared blocks, absent entries, NaN in blocks
    no row names, windows, softcap, keys in order, a table with rows past the batch."""
    for case in PAGED_CASES:
        batch, n_head, n_kv, length, n_table, block_size, head_dim, window, softcap, in_order = case
        if "q8_0" in (k_type, v_type) and head_dim % 32:
            continue
        inputs = stored_paged(
            make_paged(10, batch, n_head, n_kv, length, n_table, block_size, head_dim, in_order=in_order, extra_rows=1), k_type, v_type
        )
        opts = {**options(head_dim, window, softcap), "keys_in_order": in_order, "variant": cpu_variant}
        paged = paged_call(decode_attention_cpu, inputs, **opts)
        np.testing.assert_array_equal(paged, decode_attention_cpu(*as_slab(inputs), **opts), err_msg=str(case))
        assert np.isfinite(paged).all()
        np.testing.assert_allclose(paged, paged_call(attention_ref, inputs, **options(head_dim, window, softcap)), atol=1e-5)


@pytest.mark.parametrize("k_type, v_type", TYPE_PAIRS)
def test_cpu_prompt_kernel_reads_a_pool_in_place_as_its_slab(k_type, v_type, cpu_variant):
    """The C++ prompt kernel through a block table: the slab's bits, as the decode kernel."""
    for case in [(2, 6, 2, 40, 6, 16, 64, 0, 0.0, False), (1, 4, 1, 33, 4, 32, 64, 20, 30.0, False), (2, 3, 1, 70, 5, 32, 32, 0, 0.0, True)]:
        batch, n_head, n_kv, length, n_table, block_size, head_dim, window, softcap, in_order = case
        if "q8_0" in (k_type, v_type) and head_dim % 32:
            continue
        inputs = stored_paged(make_paged(11, batch, n_head, n_kv, length, n_table, block_size, head_dim, in_order=in_order), k_type, v_type)
        opts = {**options(head_dim, window, softcap), "keys_in_order": in_order, "variant": cpu_variant}
        paged = paged_call(prompt_attention_cpu, inputs, **opts)
        np.testing.assert_array_equal(paged, prompt_attention_cpu(*as_slab(inputs), **opts), err_msg=str(case))
        bound = prompt_bound(takes_bf16_values(inputs[2], cpu_variant), takes_int16_scores(inputs[1], cpu_variant))
        assert nmse(paged, paged_call(attention_ref, inputs, **options(head_dim, window, softcap))) < bound


def test_cpu_kernels_reject_a_table_entry_outside_the_pool(cpu_variant):
    q, k, v, q_positions, positions, table = stored_paged(make_paged(12, 1, 2, 1, 1, 3, 16, 32), "f16", "f16")
    with pytest.raises(Exception, match="outside the pool"):
        decode_attention_cpu(q, k, v, q_positions, positions, block_table=table.at[0, 1].set(k.shape[0]), variant=cpu_variant)


@pytest.mark.parametrize("case", PAGED_CASES)
def test_xla_paths_and_dispatch_read_a_pool_as_its_slab(case):
    """The chunked XLA formulation (keys in order: the used span of the logical slots), attention_cpu
    and the public attention on a pool against the same on its slab."""
    batch, n_head, n_kv, length, n_table, block_size, head_dim, window, softcap, in_order = case
    inputs = stored_paged(make_paged(13, batch, n_head, n_kv, length + 20, n_table, block_size, head_dim, in_order=in_order), "f16", "q8_0")
    opts = {**options(head_dim, window, softcap), "keys_in_order": in_order}
    slab = as_slab(inputs)
    expected = attention_ref(*slab, **options(head_dim, window, softcap))
    np.testing.assert_allclose(paged_call(attention_xla_chunked, inputs, chunk=16, **opts), expected, atol=1e-5)
    bound = default_prompt_bound(inputs[1], inputs[2])
    for got in paged_call(attention_cpu, inputs, **opts), paged_call(jax.jit(functools.partial(attention, **opts)), inputs):
        if bound is None:
            np.testing.assert_allclose(got, expected, atol=1e-5)
        else:
            assert nmse(got, expected) < bound


@pytest.mark.parametrize("k_type, v_type", [("f32", "f32"), ("q8_0", "bf16")])
@pytest.mark.parametrize("case", PAGED_CASES[:3])
def test_pallas_kernels_read_a_pool_through_the_table(case, k_type, v_type):
    """Both Pallas kernels read a pool block per table entry (absent ones skipped, NaN blocks never
    touched) and agree with the reference on the slab."""
    batch, n_head, n_kv, length, n_table, block_size, head_dim, window, softcap, in_order = case
    if "q8_0" in (k_type, v_type) and head_dim % 32:
        pytest.skip("q8_0 needs head dims of whole 32-blocks")
    inputs = stored_paged(make_paged(14, batch, n_head, n_kv, length, n_table, block_size, head_dim, in_order=in_order), k_type, v_type)
    opts = options(head_dim, window, softcap)
    expected = attention_ref(*as_slab(inputs), **opts)
    decode = paged_call(attention_pallas.decode_attention, inputs, split_k=3, interpret=INTERPRET, **opts)
    assert_pallas_close(decode, expected)
    flash = paged_call(attention_pallas.flash_attention, inputs, block_q=16, interpret=INTERPRET, **opts)
    assert_pallas_close(flash, expected)


def test_pallas_kernels_take_power_of_two_blocks_of_16_or_more():
    inputs = stored_paged(make_paged(15, 1, 2, 1, 1, 3, 16, 32), "f32", "f32")
    q, k, v, q_positions, positions, table = inputs
    with pytest.raises(ValueError, match="power of two"):
        attention_pallas.decode_attention(q, k[:, :, :8], v[:, :, :8], q_positions, positions[:, :8], block_table=table, interpret=True)
