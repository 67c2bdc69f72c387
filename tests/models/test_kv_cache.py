"""The KV cache: prefill then decode, batches with padding, chunks longer than the sliding window,
and reused batch rows all give the logits of one plain forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rz import kv_cache
from rz_run import load
from tiny_models import N_VOCAB, comparable_tiny_model

# F32 weights: the same arithmetic in differently shaped (and so differently ordered) reductions.
RELATIVE_TOLERANCE = 1e-4
# Quantized weights: the CPU kernel rounds activations to int8 (as llama.cpp does), and a rounding
# that flips between a chunked and a one-token pass moves the logits by more than reordering
# does; llama.cpp's own tolerance for quantized matmuls bounds it.
QUANTIZED_NMSE = 5e-4
MAX_SEQ_LEN = 48


@pytest.fixture(
    scope="module",
    params=[
        ("gemma3", "F32"), ("llama", "F32"), ("gemma3", "Q8_0"), ("llama", "Q4_0"),
        ("gemma2", "F32"), ("qwen3", "F32"), ("smollm3", "F32"), ("phi3", "Q8_0"),
        ("qwen3moe", "F32"), ("qwen3moe", "Q8_0"), ("qwen2moe", "Q8_0"),
    ],
    ids="-".join,
)
def model(request, tmp_path_factory):
    """Gemma 3 with a window of 8 (sliding and global layers), and a llama (global layers only): with
    F32 weights to check the cache logic tightly, and with quantized weights to check the kernel paths.
    Then each later family: Gemma 2 (soft caps, every other layer sliding), Qwen3 (QK-norm), SmolLM3
    (a layer without RoPE), Phi-3 (fused tensors, LongRoPE factors), Qwen3-MoE and Qwen2-MoE (with
    a shared expert), whose decode steps run only the chosen experts and longer steps every expert."""
    arch, weight_type = request.param
    path = comparable_tiny_model(tmp_path_factory.mktemp(arch) / "model.gguf", arch, weight_type)
    loaded = load(path)
    loaded_weight_type[id(loaded)] = weight_type
    return loaded


loaded_weight_type: dict[int, str] = {}


@pytest.fixture(scope="module")
def step(model):
    forward = jax.jit(model.forward, donate_argnums=(1,))
    lm_head = jax.jit(model.lm_head)

    def run(cache, tokens, positions):
        """One forward step over int [B, T] tokens and positions -> (logits np [B, T, V], cache)."""
        hidden, cache = forward(model.weights, cache, jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32))
        return np.asarray(lm_head(model.weights, hidden)), cache

    return run


def tokens_of(length: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, N_VOCAB, length)]


def assert_close(actual: np.ndarray, expected: np.ndarray, model) -> None:
    if loaded_weight_type[id(model)] != "F32":
        nmse = np.sum((actual - expected) ** 2) / np.sum(expected**2)
        assert nmse <= QUANTIZED_NMSE, f"NMSE {nmse:.2e} > {QUANTIZED_NMSE:.0e}"
        return
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RELATIVE_TOLERANCE * scale)


def full_pass(model, step, tokens: list[int]) -> np.ndarray:
    """Logits of tokens in one forward step from an empty cache (padded to one shape, one compile)."""
    pad = MAX_SEQ_LEN - len(tokens)
    logits, _ = step(model.init_cache(1, MAX_SEQ_LEN), [tokens + [0] * pad], [list(range(len(tokens))) + [-1] * pad])
    return logits[0, : len(tokens)]


def test_prefill_then_decode_equals_one_forward_pass(model, step):
    tokens = tokens_of(30, seed=1)
    expected = full_pass(model, step, tokens)
    prefill = 12
    logits, cache = step(model.init_cache(1, MAX_SEQ_LEN), [tokens[:prefill]], [list(range(prefill))])
    decoded = [logits[0]]
    for position in range(prefill, len(tokens)):
        logits, cache = step(cache, [[tokens[position]]], [[position]])
        decoded.append(logits[0])
    assert_close(np.concatenate(decoded), expected, model)


def test_chunks_longer_than_the_window_equal_one_forward_pass(model, step):
    tokens = tokens_of(36, seed=2)
    expected = full_pass(model, step, tokens)
    cache = model.init_cache(1, MAX_SEQ_LEN)
    chunk = 12  # longer than Gemma's window of 8: each chunk attends over cache + chunk, then keeps 8
    pieces = []
    for start in range(0, len(tokens), chunk):
        logits, cache = step(cache, [tokens[start : start + chunk]], [list(range(start, start + chunk))])
        pieces.append(logits[0])
    assert_close(np.concatenate(pieces), expected, model)


def test_batch_with_padding_equals_each_prompt_alone(model, step):
    lengths = [7, 20, 13]
    prompts = [tokens_of(n, seed=10 + i) for i, n in enumerate(lengths)]
    width = max(lengths)
    # Right-pad the first two rows, left-pad the third: padding is a position of -1 wherever it sits.
    tokens, positions = [], []
    for i, prompt in enumerate(prompts):
        pad = width - len(prompt)
        if i < 2:
            tokens.append(prompt + [0] * pad)
            positions.append(list(range(len(prompt))) + [-1] * pad)
        else:
            tokens.append([0] * pad + prompt)
            positions.append([-1] * pad + list(range(len(prompt))))
    logits, cache = step(model.init_cache(3, MAX_SEQ_LEN), tokens, positions)
    # Then one decode step for every row at once, each at its own position.
    next_tokens = tokens_of(3, seed=20)
    decoded, _ = step(cache, [[t] for t in next_tokens], [[n] for n in lengths])
    for i, prompt in enumerate(prompts):
        alone = full_pass(model, step, prompt + [next_tokens[i]])
        valid = np.asarray(positions[i]) >= 0
        assert_close(logits[i][valid], alone[: len(prompt)], model)
        assert_close(decoded[i, 0], alone[len(prompt)], model)


def test_a_reused_row_forgets_its_previous_sequence(model, step):
    """A new sequence starting at position 0 in a row that held a longer one ignores the stale slots."""
    old = tokens_of(MAX_SEQ_LEN, seed=3)
    _, cache = step(model.init_cache(1, MAX_SEQ_LEN), [old], [list(range(MAX_SEQ_LEN))])
    tokens = tokens_of(12, seed=4)
    logits, _ = step(cache, [tokens], [list(range(12))])
    assert_close(logits[0], full_pass(model, step, tokens), model)


def test_sliding_layers_keep_only_their_window(model):
    cfg = model.cfg
    cache = model.init_cache(2, MAX_SEQ_LEN)
    for sliding, layer in zip(cfg.sliding_layers, cache.layers):
        expected_slots = cfg.sliding_window if sliding else MAX_SEQ_LEN
        assert layer.keys.shape == (2, cfg.n_head_kv, expected_slots, cfg.head_dim)
        assert layer.values.shape == (2, cfg.n_head_kv, expected_slots, cfg.head_dim_v)
        assert (np.asarray(layer.positions) == kv_cache.EMPTY).all()


def test_ring_buffer_write_keeps_the_last_window_positions():
    empty = jnp.full((1, 4), kv_cache.EMPTY, jnp.int32)
    layer = kv_cache.LayerCache(keys=jnp.zeros((1, 1, 4, 2)), values=jnp.zeros((1, 1, 4, 2)), positions=empty)
    positions = jnp.array([[3, 4, 5, 6, 7, 8, -1]], jnp.int32)  # a chunk of 6 into 4 slots, then padding
    keys = jnp.broadcast_to(positions.astype(jnp.float32)[:, :, None, None], (1, 7, 1, 2))
    written = kv_cache.write(layer, keys, keys, positions)
    # Position p sits in slot p % 4; positions 3 and 4 were overwritten by 7 and 8.
    np.testing.assert_array_equal(np.asarray(written.positions), [[8, 5, 6, 7]])
    np.testing.assert_array_equal(np.asarray(written.keys)[0, 0, :, 0], [8, 5, 6, 7])
