"""The KV cache, a pool of blocks read and written through block tables: prefill then decode, batches
with padding, chunks longer than the sliding window, rings of blocks that wrap, reused rows, and
permuted or shared tables all give the logits of one plain forward pass; and writes through a
table, on their own."""

from types import SimpleNamespace

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
# Small blocks, and chunks of at most 12 tokens: Gemma 3's sliding layers (window 8) get a ring of
# 4 blocks (32 slots), which the sequences here wrap.
BLOCK_SIZE = 8
MAX_WRITE = 12


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


# This file checks the cache's logic, so its caches are f32: an f16 one's prompt attention may
# multiply its values in bf16 where a decode step does not (rz_kernels.causal_attention.
# takes_bf16_values), which moved a tiny MoE's expert choices. tests/kernels checks each type.
CACHE_TYPES = kv_cache.CacheTypes("f32", "f32")


def paged(model, n_rows: int) -> kv_cache.KVCache:
    """An empty cache of small blocks for n_rows rows, with identity tables."""
    return model.init_cache(n_rows, MAX_SEQ_LEN, CACHE_TYPES, block_size=BLOCK_SIZE, max_write=MAX_WRITE)


def full_pass(model, step, tokens: list[int]) -> np.ndarray:
    """Logits of tokens in one forward step from an empty cache whose rings hold the whole context
    (padded to one shape, one compile)."""
    pad = MAX_SEQ_LEN - len(tokens)
    logits, _ = step(model.init_cache(1, MAX_SEQ_LEN, CACHE_TYPES), [tokens + [0] * pad], [list(range(len(tokens))) + [-1] * pad])
    return logits[0, : len(tokens)]


def test_prefill_then_decode_equals_one_forward_pass(model, step):
    tokens = tokens_of(38, seed=1)  # decode steps past the ring's 32 slots: its blocks are recycled
    expected = full_pass(model, step, tokens)
    prefill = 12
    logits, cache = step(paged(model, 1), [tokens[:prefill]], [list(range(prefill))])
    decoded = [logits[0]]
    for position in range(prefill, len(tokens)):
        logits, cache = step(cache, [[tokens[position]]], [[position]])
        decoded.append(logits[0])
    assert_close(np.concatenate(decoded), expected, model)


def test_chunks_longer_than_the_window_equal_one_forward_pass(model, step):
    tokens = tokens_of(36, seed=2)
    expected = full_pass(model, step, tokens)
    cache = paged(model, 1)
    chunk = MAX_WRITE  # longer than Gemma's window of 8, and starting mid-block
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
    logits, cache = step(paged(model, 3), tokens, positions)
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
    cache = paged(model, 1)
    for start in range(0, MAX_SEQ_LEN, MAX_WRITE):
        _, cache = step(cache, [old[start : start + MAX_WRITE]], [list(range(start, start + MAX_WRITE))])
    tokens = tokens_of(12, seed=4)
    logits, _ = step(cache, [tokens], [list(range(12))])
    assert_close(logits[0], full_pass(model, step, tokens), model)


def test_rows_read_any_blocks_their_tables_name(model, step):
    """Reversed tables (each row's blocks in the other order, row 0 in row 1's blocks) give the
    logits of identity tables; and a row whose tables are another's reads what that row wrote."""
    tokens = tokens_of(20, seed=5)
    expected = full_pass(model, step, tokens)
    identity = paged(model, 2)
    reversed_tables = [np.asarray(table)[::-1, ::-1] for table in identity.tables]
    cache = identity.with_tables(tuple(jnp.asarray(table) for table in reversed_tables))
    logits, cache = step(cache, [tokens[:12], [0] * 12], [list(range(12)), [-1] * 12])
    assert_close(logits[0], expected[:12], model)
    # Row 1 reads row 0's blocks, and decodes the next token as row 0 would.
    shared = cache.with_tables(tuple(jnp.asarray(np.stack([table[0], table[0]])) for table in reversed_tables))
    logits, _ = step(shared, [[0], [tokens[12]]], [[-1], [12]])
    assert_close(logits[1, 0], expected[12], model)


def test_caches_hold_their_tables_blocks(model):
    cfg = model.cfg
    cache = paged(model, 2)
    lengths = kv_cache.table_lengths(cfg, MAX_SEQ_LEN, BLOCK_SIZE, MAX_WRITE)
    assert lengths[0] == MAX_SEQ_LEN // BLOCK_SIZE
    for sliding, table in enumerate(cache.tables):
        np.testing.assert_array_equal(np.asarray(table), np.arange(2 * lengths[sliding]).reshape(2, lengths[sliding]))
    for index, sliding in enumerate(cfg.sliding_layers):
        layer = cache.layer(index)
        n_blocks = 2 * lengths[sliding]
        assert layer.keys.shape == (n_blocks, cfg.n_head_kv, BLOCK_SIZE, cfg.head_dim)
        assert layer.values.shape == (n_blocks, cfg.n_head_kv, BLOCK_SIZE, cfg.head_dim_v)
        assert (np.asarray(layer.positions) == kv_cache.EMPTY).all()


def test_sliding_layers_keep_a_ring_of_about_their_window():
    """The window, the longest chunk and a block more, rounded up to blocks; never more than the context."""
    cfg = SimpleNamespace(sliding_layers=(True, False), sliding_window=8)  # what table_lengths reads of a ModelConfig
    assert kv_cache.table_lengths(cfg, 4096, 16, 12) == (256, 3)
    assert kv_cache.table_lengths(cfg, 32, 16, 128) == (2, 2)
    assert kv_cache.ring(cfg, 4096, 16, 12) == (48, 48 - 16 - 8)


def layer_of(positions: list[list[int]]) -> kv_cache.LayerCache:
    """A pool of len(positions) blocks (one head of width 1) whose slots hold the given positions, as keys too."""
    held = jnp.asarray(positions, jnp.int32)
    keys = held.astype(jnp.float32)[:, None, :, None]
    return kv_cache.LayerCache(keys=keys, values=keys, positions=held)


def written(layer: kv_cache.LayerCache, table: list[list[int]], positions: list[list[int]]) -> kv_cache.LayerCache:
    positions = jnp.asarray(positions, jnp.int32)
    keys = positions.astype(jnp.float32)[:, :, None, None]
    return kv_cache.write(kv_cache.LayerView(layer, jnp.asarray(table, jnp.int32)), keys, keys, positions)


def test_a_write_goes_through_the_table_and_a_blocks_first_slot_clears_the_rest():
    E = kv_cache.EMPTY
    # Three blocks of 4 slots, holding a previous lap's positions; the row's table is blocks 2, 0.
    layer = layer_of([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    out = written(layer, [[2, 0]], [[5, 6, 7, 8, 9, -1]])  # mid-block 1 (block 0), into block 0 (block 2), padding
    np.testing.assert_array_equal(np.asarray(out.positions), [[0, 5, 6, 7], [4, 5, 6, 7], [8, 9, E, E]])
    # Clearing hides a slot's key; the key itself stays until the slot is written.
    np.testing.assert_array_equal(np.asarray(out.keys)[:, 0, :, 0], [[0, 5, 6, 7], [4, 5, 6, 7], [8, 9, 10, 11]])


def test_a_chunk_starting_mid_block_keeps_the_blocks_earlier_slots():
    E = kv_cache.EMPTY
    layer = layer_of([[0, 1, E, 7], [E, E, E, E]])  # 7: a stale later position
    out = written(layer, [[0, 1]], [[2, 3, 4]])
    np.testing.assert_array_equal(np.asarray(out.positions), [[0, 1, 2, 3], [4, E, E, E]])


def test_absent_table_entries_and_padding_are_never_written():
    E = kv_cache.EMPTY
    layer = layer_of([[E, E], [E, E]])
    out = written(layer, [[-1, 0], [1, 1]], [[0, 1, 2, 3], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(np.asarray(out.positions), [[2, 3], [E, E]])


def test_a_chunk_longer_than_a_ring_keeps_its_last_positions():
    E = kv_cache.EMPTY
    layer = layer_of([[E, E], [E, E]])  # a ring of two blocks of 2
    out = written(layer, [[1, 0]], [[3, 4, 5, 6, 7, -1]])  # 5 positions into 4 slots, then padding
    # Position p sits in block table[(p // 2) % 2], slot p % 2; position 3 was overwritten by 7.
    np.testing.assert_array_equal(np.asarray(out.positions), [[6, 7], [4, 5]])


def test_identity_tables_give_each_row_its_own_blocks():
    global_table, sliding_table = kv_cache.identity_tables(2, (3, 2))
    np.testing.assert_array_equal(np.asarray(global_table), [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(np.asarray(sliding_table), [[0, 1], [2, 3]])


def test_through_table_lays_a_rows_blocks_out_in_logical_order():
    E = kv_cache.EMPTY
    layer = layer_of([[4, 5], [0, 1], [2, 3]])
    keys, _, positions = kv_cache.through_table(kv_cache.LayerView(layer, jnp.asarray([[1, 2, 0, -1]], jnp.int32)))
    np.testing.assert_array_equal(np.asarray(positions), [[0, 1, 2, 3, 4, 5, E, E]])
    np.testing.assert_array_equal(np.asarray(keys)[0, 0, :6, 0], [0, 1, 2, 3, 4, 5])


def test_copy_blocks_copies_every_layer_of_a_kind():
    """Two global layers and a sliding one, three blocks each: each layer's blocks copied within it."""
    E = kv_cache.EMPTY
    global_pool = layer_of([[0, 1], [E, E], [7, 7], [2, 3], [E, E], [8, 8]])
    cache = kv_cache.KVCache((global_pool, layer_of([[0, 1], [E, E], [7, 7]])), kv_cache.identity_tables(1, (3, 3)), (False, True, False), (3, 3))
    copied = kv_cache.copy_blocks(cache, (jnp.asarray([0, 2]), jnp.asarray([0, 0])), (jnp.asarray([1, -1]), jnp.asarray([2, 1])))
    np.testing.assert_array_equal(np.asarray(copied.layer(0).positions), [[0, 1], [0, 1], [7, 7]])
    np.testing.assert_array_equal(np.asarray(copied.layer(2).positions), [[2, 3], [2, 3], [8, 8]])
    np.testing.assert_array_equal(np.asarray(copied.layer(1).positions), [[0, 1], [0, 1], [0, 1]])
