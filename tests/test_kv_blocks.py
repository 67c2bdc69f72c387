"""rz.kv_blocks on its own: pool sizing, admission with prefix reuse, tables grown as writes
reach them (rings recycled), blocks cached as tokens are committed, and released; checked
against a fake device that records what each block slot holds."""

import random

import pytest

from rz.config import ModelConfig
from rz.errors import ContextOverflowError, RequestError
from rz.kv_blocks import NO_BLOCK, BlockPlan, KVBlocks, KVCacheCapacityError, SequenceBlocks

GLOBAL, SLIDING = False, True


def tiny_config(n_layer: int = 4, sliding: tuple[int, ...] = (), window: int = 0, n_head_kv: int = 2,
                head_dim: int = 64, head_dim_v: int | None = None) -> ModelConfig:
    """A model's shape, no more: the allocator reads only the layers' kinds, heads and window."""
    return ModelConfig(
        architecture="gemma3" if sliding else "llama", name="tiny", n_vocab=100, n_embd=128, n_layer=n_layer,
        n_head=4, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v or head_dim, n_ff=256,
        n_expert=0, n_expert_used=0, n_ff_expert=0, n_ff_shared_expert=0, normalize_expert_weights=True,
        context_length=4096, norm_eps=1e-6, rope_base=1e4, rope_base_sliding=1e4, rope_dim=head_dim,
        rope_scaling="none", rope_scaling_factor=1.0, rope_scaling_original_context=4096, rope_attn_factor=1.0,
        rope_short_factors_context=0, rope_long_factors=False, sliding_window=window if sliding else 0,
        sliding_layers=tuple(i in sliding for i in range(n_layer)), rope_layers=(True,) * n_layer,
        attn_logit_softcap=0.0, final_logit_softcap=0.0, tie_embeddings=True, chat_template=None,
    )


GLOBAL_ONLY = tiny_config()
MIXED = tiny_config(n_layer=6, sliding=(0, 1, 2, 3, 4), window=8)  # Gemma 3's five sliding layers to one global
SLIDING_ONLY = tiny_config(n_layer=2, sliding=(0, 1), window=8)


def small_plan(cfg=GLOBAL_ONLY, *, n_ctx=64, n_slots=2, block_size=4, max_write=8, **sizing) -> BlockPlan:
    return BlockPlan.for_model(cfg, n_ctx=n_ctx, n_slots=n_slots, block_size=block_size, max_write=max_write, **sizing)


class Device:
    """What a writer leaves in the pools: per kind and block, the (position, token) of each slot."""

    def __init__(self, plan: BlockPlan):
        self.block_size = plan.block_size
        self.window = plan.window
        self.slots = {pool.sliding: [[None] * plan.block_size for _ in range(pool.n_blocks)] for pool in plan.pools}

    def write(self, seq: SequenceBlocks, start: int, tokens) -> None:
        for kind, table in seq.tables.items():
            for position, token in enumerate(tokens, start):
                block = table[(position // self.block_size) % len(table)]
                assert block != NO_BLOCK, f"position {position} has no block"
                self.slots[kind][block][position % self.block_size] = (position, token)

    def copy(self, kv: KVBlocks, seq: SequenceBlocks) -> None:
        """What the engine does after an admission: copy the blocks it asks for."""
        for kind, (source, destination) in seq.copies.items():
            self.slots[kind][destination] = list(self.slots[kind][source])
        kv.copied(seq)

    def holds(self, seq: SequenceBlocks, kind: bool, start: int, end: int) -> bool:
        """Whether the sequence's table maps positions [start, end) to slots holding its tokens."""
        table = seq.tables[kind]
        return all(
            self.slots[kind][table[(p // self.block_size) % len(table)]][p % self.block_size] == (p, seq.tokens[p])
            for p in range(start, end)
        )

    def holds_history(self, seq: SequenceBlocks, end: int) -> bool:
        """What a query at `end` attends to: every earlier position in the global pool, the window's in the sliding one."""
        return all(
            self.holds(seq, kind, max(0, end - self.window + 1) if kind else 0, end) for kind in seq.tables
        )


def prefill(kv: KVBlocks, device: Device, seq: SequenceBlocks, chunk: int | None = None) -> None:
    """Write the prompt after its cached prefix, chunk by chunk, committing each."""
    chunk = chunk or kv.plan.max_write
    while seq.n_committed < len(seq.tokens):
        start = seq.n_committed
        end = min(start + chunk, len(seq.tokens))
        kv.grow(seq, start, end)
        device.write(seq, start, seq.tokens[start:end])
        kv.commit(seq, end)


def decode(kv: KVBlocks, device: Device, seq: SequenceBlocks, new_tokens) -> None:
    """Sample each token, then feed it: its position is written and committed one step later."""
    for token in new_tokens:
        kv.commit(seq, seq.n_committed, [token])
        position = seq.n_committed
        kv.grow(seq, position, position + 1)
        device.write(seq, position, [token])
        kv.commit(seq, position + 1)


def admitted(kv: KVBlocks, prompt, max_tokens: int = 4, cache_prompt: bool = True, device: Device | None = None) -> SequenceBlocks:
    seq = kv.admit(prompt, max_tokens, cache_prompt)
    assert seq is not None
    if device is not None:
        device.copy(kv, seq)
    assert not seq.copies, "the admission asks for a copy: give the device"
    return seq


def cached(prompt, cfg=GLOBAL_ONLY) -> tuple[KVBlocks, Device, SequenceBlocks]:
    """An allocator whose cache holds a prompt's blocks (a sequence prefilled and released), its
    device, and that sequence."""
    kv = KVBlocks(small_plan(cfg))
    device = Device(kv.plan)
    seq = admitted(kv, prompt)
    prefill(kv, device, seq)
    kv.release(seq)
    return kv, device, seq


def check_invariants(kv: KVBlocks, live: list[SequenceBlocks]) -> None:
    """Every block is free, cached or in use, its count of references that of the live tables that hold it."""
    for kind, pool in kv.pools.items():
        stats = kv.stats().pools[kind]
        assert stats.free + stats.cached + stats.in_use == stats.total
        refs = [0] * pool.plan.n_blocks
        for seq in live:
            held = [block for block in seq.tables[kind] if block != NO_BLOCK]
            assert len(held) == len(set(held)) <= seq.peaks[kind]
            for block in held:
                refs[block] += 1
        assert refs == pool.refs
        assert all(refs[block] == 0 and pool.hash_of[block] is None for block in pool.free)
        assert all(refs[block] == 0 and (pool.hash_of[block] is not None) != (block in pool.partial_of) for block in pool.evictable)
        assert set(pool.partial_of) <= set(pool.evictable)
        assert set(pool.full_of) == set(pool.by_hash.values())
        assert {(h, block) for block, (h, _) in pool.full_of.items()} == {(h, b) for h, blocks in pool.fulls.items() for b in blocks}
        assert {(h, block) for block, (h, _) in pool.partial_of.items()} == {(h, b) for h, blocks in pool.partials.items() for b in blocks}
        assert {block: h for h, block in pool.by_hash.items()} == {b: h for b, h in enumerate(pool.hash_of) if h is not None}
        assert pool.promised <= pool.plan.n_blocks
        assert pool.reserved == sum(seq.peaks[kind] for seq in live)


# ----- the plan -----


def test_a_block_holds_keys_values_and_positions_of_every_layer_of_its_kind():
    # 2 KV heads x 4 slots x 64 dims = 512 values per layer for keys, as many for values; 4 int32 positions.
    per_type = {"f32": 512 * 4, "f16": 512 * 2, "bf16": 512 * 2, "q8_0": 512 // 32 * 34}
    for type_k, k_bytes in per_type.items():
        for type_v, v_bytes in per_type.items():
            plan = small_plan(GLOBAL_ONLY, cache_type_k=type_k, cache_type_v=type_v)
            assert plan.pools[0].block_bytes == 4 * (k_bytes + v_bytes + 4 * 4)
            assert plan.total_bytes == plan.pools[0].n_blocks * plan.pools[0].block_bytes


def test_values_of_another_head_dim_are_sized_by_it():
    plan = small_plan(tiny_config(n_layer=1, head_dim=64, head_dim_v=32), cache_type_k="f32", cache_type_v="q8_0")
    assert plan.pools[0].block_bytes == 2 * 4 * 64 * 4 + 2 * 4 * 32 // 32 * 34 + 4 * 4


def test_by_default_the_pools_hold_every_slot_at_the_whole_context():
    plan = small_plan(MIXED, n_ctx=64, n_slots=3, block_size=4, max_write=8)
    global_pool, sliding_pool = plan.pools
    assert (global_pool.sliding, global_pool.n_layers, global_pool.table_length, global_pool.n_blocks) == (False, 1, 16, 48)
    # A ring holds the window (8) and a chunk (8) in blocks of 4, and one block more.
    assert (sliding_pool.sliding, sliding_pool.n_layers, sliding_pool.table_length, sliding_pool.n_blocks) == (True, 5, 5, 15)
    assert sliding_pool.block_bytes == 5 * global_pool.block_bytes
    assert plan.peak_blocks(30) == {GLOBAL: 8, SLIDING: 5}
    assert plan.peak_blocks(7) == {GLOBAL: 2, SLIDING: 2}


def test_a_model_has_the_pools_of_its_layer_kinds_only():
    assert [pool.sliding for pool in small_plan(GLOBAL_ONLY).pools] == [GLOBAL]
    assert [pool.sliding for pool in small_plan(SLIDING_ONLY).pools] == [SLIDING]
    assert small_plan(GLOBAL_ONLY).window == 0


def test_a_ring_never_outgrows_the_context():
    plan = small_plan(MIXED, n_ctx=12, max_write=8)
    assert plan.pool(SLIDING).table_length == plan.pool(GLOBAL).table_length == 3


def test_a_token_budget_sizes_the_global_pool_and_as_many_rings_as_it_holds():
    plan = small_plan(MIXED, n_slots=4, kv_cache_tokens=50)
    assert plan.pool(GLOBAL).n_blocks == 13
    assert plan.pool(SLIDING).n_blocks == 13  # as many positions, within 1..4 rings of 5
    assert small_plan(MIXED, n_slots=4, kv_cache_tokens=8).pool(SLIDING).n_blocks == 5
    assert small_plan(MIXED, n_slots=4, kv_cache_tokens=1000).pool(SLIDING).n_blocks == 20
    assert small_plan(SLIDING_ONLY, n_slots=4, kv_cache_tokens=8).pool(SLIDING).n_blocks == 5


def test_available_memory_caps_the_default_pools():
    whole = small_plan(MIXED, n_slots=4)  # per sequence, 16 global blocks and a ring of 5 sliding ones (5 layers each)
    capped = small_plan(MIXED, n_slots=4, memory_bytes=whole.total_bytes // 2)
    # The rings of two whole sequences, and the rest of the memory in global blocks.
    assert capped.pool(SLIDING).n_blocks == 10
    assert capped.pool(GLOBAL).n_blocks == 32
    assert capped.total_bytes == whole.total_bytes // 2
    assert small_plan(GLOBAL_ONLY, n_slots=4, memory_bytes=21 * 8256).pool(GLOBAL).n_blocks == 21


def test_too_little_memory_for_one_sequence_says_what_to_lower():
    one = small_plan(MIXED, n_slots=1)
    with pytest.raises(RequestError, match="one sequence of n_ctx=64 needs .* lower n_ctx, or use q8_0"):
        small_plan(MIXED, n_slots=4, memory_bytes=one.total_bytes - 1)
    with pytest.raises(RequestError, match="kv_cache_tokens=640 needs .* lower kv_cache_tokens"):
        small_plan(MIXED, kv_cache_tokens=640, memory_bytes=one.total_bytes)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_size": 24}, "block_size must be a power of two, got 24"),
        ({"block_size": 0}, "block_size must be a positive integer"),
        ({"n_ctx": 0}, "n_ctx must be a positive integer"),
        ({"kv_cache_tokens": 3}, r"kv_cache_tokens \(3\) must hold at least one block of 4 tokens"),
        ({"cache_type_k": "q4_0"}, "unknown cache_type_k 'q4_0'"),
    ],
)
def test_bad_sizes_are_request_errors_naming_the_option(change, message):
    with pytest.raises(RequestError, match=message):
        small_plan(GLOBAL_ONLY, **change)


def test_a_q8_0_cache_needs_head_dims_of_whole_blocks():
    with pytest.raises(RequestError, match="multiples of 32"):
        small_plan(tiny_config(head_dim=48), cache_type_v="q8_0")


def test_the_summary_names_blocks_bytes_and_types():
    line = small_plan(MIXED, n_slots=3, cache_type_k="q8_0").summary()
    assert line.startswith("KV cache: blocks of 4 positions, K q8_0, V f16;")
    assert "global 48 blocks = 192 tokens (3 x n_ctx 64)" in line and "sliding 15 blocks = 3 rings of 5 (window 8)" in line
    assert line.endswith("MiB in all")


# ----- admission, prefix reuse, release -----


def test_a_request_beyond_the_context_or_the_whole_pool_can_never_fit():
    kv = KVBlocks(small_plan(GLOBAL_ONLY, n_ctx=64, kv_cache_tokens=32))
    with pytest.raises(ContextOverflowError, match="more than the context size 64; .* larger n_ctx") as overflow:
        kv.check_fits(60, 5)
    assert not isinstance(overflow.value, KVCacheCapacityError)  # a bad request, not a full server
    with pytest.raises(KVCacheCapacityError, match="more than the 32 the whole cache holds; .* larger kv_cache_tokens"):
        kv.admit(list(range(30)), 3)
    assert issubclass(KVCacheCapacityError, ContextOverflowError)
    kv.check_fits(30, 2)


def test_a_second_request_maps_the_full_blocks_of_the_first_and_copies_its_next_tokens():
    kv = KVBlocks(small_plan(GLOBAL_ONLY))
    device = Device(kv.plan)
    first = admitted(kv, list(range(10)))
    prefill(kv, device, first)
    second = kv.admit(list(range(9)) + [50, 51], 4)
    # 9 shared tokens, while the first sequence still runs: 2 full blocks mapped, and the first
    # slot of its third block (which it goes on writing) copied into a block of the second's own.
    assert second.n_cached == 9 and second.n_committed == 9
    assert second.tables[GLOBAL][:2] == first.tables[GLOBAL][:2]
    assert second.copies == {GLOBAL: (first.tables[GLOBAL][2], second.tables[GLOBAL][2])}
    assert second.tables[GLOBAL][3:] == [NO_BLOCK] * 13
    assert [kv.pools[GLOBAL].refs[block] for block in first.tables[GLOBAL][:3]] == [2, 2, 1]
    device.copy(kv, second)
    assert not second.copies and device.holds_history(second, 9)
    prefill(kv, device, second)
    assert second.tables[GLOBAL][2] != first.tables[GLOBAL][2]
    check_invariants(kv, [first, second])
    assert kv.stats().hit_tokens == 9 and kv.stats().prompt_tokens == 21


def test_the_last_prompt_token_is_computed_again_even_if_every_block_is_cached():
    kv, device, _ = cached(list(range(8)))
    # One block mapped, and 3 tokens of the second copied.
    assert admitted(kv, list(range(8)), device=device).n_cached == 7
    assert admitted(kv, list(range(9)), device=device).n_cached == 8


def test_without_cache_prompt_nothing_is_mapped_but_its_blocks_are_cached_for_others():
    kv = KVBlocks(small_plan(GLOBAL_ONLY))
    device = Device(kv.plan)
    first = admitted(kv, list(range(10)))
    prefill(kv, device, first)
    private = admitted(kv, list(range(10)), cache_prompt=False)
    assert private.n_cached == 0 and NO_BLOCK == private.tables[GLOBAL][0]
    kv.release(first)
    prefill(kv, device, private)
    kv.release(private)
    # The same tokens twice: the second copy is not cached (the first's two full blocks and its
    # partly written last one already are).
    assert kv.stats().pools[GLOBAL].cached == 3


def test_released_blocks_stay_cached_until_cleared():
    kv = KVBlocks(small_plan(GLOBAL_ONLY))
    device = Device(kv.plan)
    seq = admitted(kv, list(range(10)))
    prefill(kv, device, seq)
    decode(kv, device, seq, [70, 71, 72])
    kv.release(seq)
    stats = kv.stats().pools[GLOBAL]
    # 13 positions written: 3 full blocks cached, and the partly written fourth kept.
    assert (stats.cached, stats.in_use, stats.free) == (4, 0, stats.total - 4)
    kv.clear_cache()
    assert kv.stats().pools[GLOBAL].free == stats.total
    assert admitted(kv, list(range(10))).n_cached == 0


@pytest.mark.parametrize("cfg", [GLOBAL_ONLY, MIXED], ids=["global", "mixed"])
def test_forgetting_the_prompts_that_start_with_a_token_keeps_every_other_prompt_cached(cfg):
    """What the warm-up does at its end (rz.warm_up): its prompts' blocks are freed, full and partly
    written, and the blocks cached after them; a request's that ran in between stay cached."""
    kv = KVBlocks(small_plan(cfg))
    device = Device(kv.plan)
    warm = [0] + list(range(20, 29))  # 10 tokens: two full blocks and a partly written one
    short = [0, 0]  # a partly written block only
    other = [5] + list(range(40, 49))
    for prompt in (warm, short, other):
        seq = admitted(kv, prompt, device=device)
        prefill(kv, device, seq)
        decode(kv, device, seq, [7])
        kv.release(seq)
    before = kv.stats().pools[GLOBAL]
    kv.forget_prompts_starting((0,))
    after = kv.stats().pools[GLOBAL]
    # 11 positions each in blocks of 4: warm's and other's two full blocks and a partial; short's one partial.
    assert (after.cached, after.free) == (before.cached - 4, before.free + 4) == (3, after.total - 3)
    assert admitted(kv, other, device=device).n_cached >= 8
    assert admitted(kv, warm, device=device).n_cached == 0


@pytest.mark.parametrize("cfg", [GLOBAL_ONLY, MIXED], ids=["global", "mixed"])
def test_a_chat_s_next_turn_takes_over_the_last_turn_s_partly_written_block(cfg):
    kv = KVBlocks(small_plan(cfg))
    device = Device(kv.plan)
    turn = admitted(kv, list(range(10)))
    prefill(kv, device, turn)
    decode(kv, device, turn, [70])  # 11 positions written
    kv.release(turn)
    following = turn.tokens + [80, 81, 82]
    seq = admitted(kv, following)
    # Two full blocks mapped, and the third (positions 8..10 written) taken over as it is.
    assert seq.n_cached == seq.n_committed == 11
    assert all(kv.pools[kind].refs[table[2]] == 1 for kind, table in seq.tables.items())
    assert device.holds_history(seq, 11)
    prefill(kv, device, seq)
    assert device.holds_history(seq, len(following))
    check_invariants(kv, [seq])
    assert kv.stats().hit_tokens == 11


def test_a_partly_written_block_serves_once_a_prompt_sharing_at_least_half_its_tokens():
    kv, device, _ = cached(list(range(11)))  # positions 8..10 of the third block written
    # Sharing one of its three tokens: the block stays kept for a better match.
    sharing_less = admitted(kv, list(range(9)) + [60, 61], device=device)
    assert sharing_less.n_cached == 9  # the token it shares is copied
    prefill(kv, device, sharing_less)
    kv.release(sharing_less)
    diverging = list(range(10)) + [50, 51, 52]
    seq = admitted(kv, diverging, device=device)
    assert seq.n_cached == 10  # positions 8 and 9 match, 10 does not
    prefill(kv, device, seq)  # position 10 onward written again: the old 10 is replaced
    assert device.holds_history(seq, len(diverging))
    # Taken over, the block is no longer kept: once that prompt is done, its third block is full of
    # its own tokens, and a second continuation copies the two it shares.
    kv.release(seq)
    other = admitted(kv, list(range(11)) + [60], device=device)
    assert other.n_cached == 10
    assert device.holds_history(other, 10)
    check_invariants(kv, [other])


def test_a_failed_or_cleared_sequence_keeps_no_partly_written_block():
    kv = KVBlocks(small_plan(GLOBAL_ONLY))
    device = Device(kv.plan)
    seq = admitted(kv, list(range(10)))
    prefill(kv, device, seq)
    kv.release(seq, failed=True)
    assert admitted(kv, list(range(12))).n_cached == 0  # nor its full blocks
    kv, _, _ = cached(list(range(10)))
    kv.clear_cache()
    assert admitted(kv, list(range(12))).n_cached == 0


def test_a_sliding_prefix_needs_only_the_blocks_its_first_query_sees():
    prompt = list(range(40))
    kv, device, seq = cached(prompt, MIXED)  # in rings of 5 blocks of 4, a window of 8
    sliding = kv.pools[SLIDING]
    block_of = {j: sliding.by_hash[h] for j, h in enumerate(seq.hashes)}
    # Every full block passed through the ring and was cached as it left it: 10 blocks.
    assert sorted(block_of) == list(range(10))
    # 39 tokens may come from the cache: 9 blocks, whose first recomputed query (position 36)
    # sees keys 29..35, in blocks 7 and 8. A hole before them does not matter ...
    sliding.forget(block_of[5])
    again = admitted(kv, prompt, device=device)
    # (and 3 tokens of the tenth block, copied)
    assert again.n_cached == 39
    mapped = {block for block in again.tables[SLIDING] if block != NO_BLOCK}
    assert mapped - {again.tables[SLIDING][9 % 5]} == {block_of[7], block_of[8]}
    assert device.holds_history(again, 39)
    kv.release(again)
    # ... one within them does: the longest prefix whose window is whole is 8 blocks (keys 25..31).
    sliding.forget(block_of[8])
    assert admitted(kv, prompt).n_cached == 32


def test_the_prefix_is_the_shortest_that_every_pool_serves():
    prompt = list(range(40))
    kv, device, seq = cached(prompt, MIXED)
    kv.pools[GLOBAL].forget(kv.pools[GLOBAL].by_hash[seq.hashes[3]])
    again = admitted(kv, prompt)
    assert again.n_cached == 12
    assert device.holds_history(again, 12)


def test_admission_waits_while_the_pool_is_promised_and_succeeds_after_a_release():
    kv = KVBlocks(small_plan(GLOBAL_ONLY, n_ctx=64, kv_cache_tokens=32, max_write=4))
    # A reservation covers the prompt and max_tokens, less the last token (never fed), and max_write past it.
    first = admitted(kv, list(range(20)), max_tokens=1)  # 20 + 1 - 1 + 4 positions: 6 blocks of 8
    assert kv.admit([90] * 5, 1) is None  # 5 + 1 - 1 + 4 positions: 3 blocks
    assert kv.admit([90] * 3, 1) is not None  # 2 blocks
    kv.release(first)
    assert kv.admit([90] * 5, 1) is not None


def test_a_shared_prefix_in_use_counts_once_against_the_global_pool():
    kv = KVBlocks(small_plan(GLOBAL_ONLY, n_ctx=64, kv_cache_tokens=48, max_write=4))
    device = Device(kv.plan)
    prompt = list(range(25))
    first = admitted(kv, prompt, max_tokens=4)  # 25 + 4 - 1 + 4 = 32 positions: 8 of 12 blocks
    prefill(kv, device, first)
    # A copy maps the first 6 blocks that the first holds, and needs 2 more of its own.
    second = admitted(kv, prompt, max_tokens=4)
    assert second.n_cached == 24
    assert kv.admit(list(range(100, 110)), 1) is None
    check_invariants(kv, [first, second])


def test_a_sliding_pool_promises_every_sequence_its_whole_ring_even_one_that_maps_shared_blocks():
    # A ring drops blocks as it goes; one that another sequence still maps stays in use, and a
    # fresh block takes its entry: sharing saves a ring no blocks.
    kv = KVBlocks(small_plan(SLIDING_ONLY, n_ctx=64, n_slots=3, max_write=4, kv_cache_tokens=40))
    assert (kv.plan.pool(SLIDING).table_length, kv.plan.pool(SLIDING).n_blocks) == (4, 10)
    device = Device(kv.plan)
    prompt = list(range(16))
    first = admitted(kv, prompt, max_tokens=20)
    prefill(kv, device, first)
    second = admitted(kv, prompt, max_tokens=20, device=device)
    # Its window's blocks, 1 and 2, which the first holds too, and 3 tokens copied from the first's fourth.
    assert second.n_cached == 15
    assert kv.admit([99] * 10, 1) is None  # 4 more blocks would fit the blocks in use, not the two rings
    prefill(kv, device, second)
    for token in range(20):
        for seq in (first, second):
            decode(kv, device, seq, [token])
            assert device.holds_history(seq, seq.n_committed)
    check_invariants(kv, [first, second])


def test_an_admitted_sequence_grows_to_its_whole_reservation_whatever_the_others_do():
    kv = KVBlocks(small_plan(MIXED, n_ctx=64, kv_cache_tokens=48, max_write=4))
    device = Device(kv.plan)
    rng = random.Random(3)
    sequences = [admitted(kv, [rng.randrange(5) for _ in range(9)], max_tokens=10) for _ in range(2)]
    assert kv.admit([1, 2, 3], 20) is None
    for _ in range(10):
        for seq in sequences:
            if len(seq.tokens) < 19:
                prefill(kv, device, seq)
                decode(kv, device, seq, [rng.randrange(5)])
    for seq in sequences:
        # Writes past the end, up to max_write past the committed positions, still find blocks.
        kv.grow(seq, seq.n_committed, seq.span)
        check_invariants(kv, sequences)


def test_the_least_recently_used_cached_blocks_are_evicted_first_from_a_chain_s_end():
    kv = KVBlocks(small_plan(GLOBAL_ONLY, n_ctx=16, kv_cache_tokens=24, max_write=4))  # 6 blocks of 4
    device = Device(kv.plan)
    old, recent = [1] * 9, [2] * 9
    for prompt in (old, recent):
        seq = admitted(kv, prompt, max_tokens=1)
        prefill(kv, device, seq)
        kv.release(seq)
    assert kv.stats().pools[GLOBAL].cached == 6  # 2 full blocks each, and the partly written third
    # 2 blocks, the least recently used cached ones: the old prompt's last two.
    filler = admitted(kv, [3] * 8, max_tokens=1)
    prefill(kv, device, filler)
    kv.release(filler)
    for prompt, n_cached in ((old, 4), (recent, 8)):
        seq = admitted(kv, prompt, max_tokens=1)
        assert seq.n_cached == n_cached
        kv.release(seq)


def test_a_failed_sequence_leaves_the_pools_as_they_were():
    kv, device, _ = cached(list(range(12)), MIXED)
    baseline = kv.stats()
    hashes = {kind: dict(pool.by_hash) for kind, pool in kv.pools.items()}
    seq = admitted(kv, list(range(30)), max_tokens=8)
    assert seq.n_cached == 12
    prefill(kv, device, seq)
    decode(kv, device, seq, [7, 8, 9])
    kv.release(seq, failed=True)
    assert kv.stats().pools == baseline.pools
    assert {kind: dict(pool.by_hash) for kind, pool in kv.pools.items()} == hashes
    check_invariants(kv, [])


def test_a_failed_sequence_keeps_the_blocks_another_one_maps():
    kv = KVBlocks(small_plan(GLOBAL_ONLY))
    device = Device(kv.plan)
    first = admitted(kv, list(range(12)))
    prefill(kv, device, first)
    second = admitted(kv, list(range(12)), device=device)
    kv.release(first, failed=True)
    assert kv.stats().pools[GLOBAL].cached == 0
    kv.release(second)
    # The two blocks it mapped, and its own third (3 tokens copied from the first's), partly written.
    assert kv.stats().pools[GLOBAL].cached == 3


def test_a_ring_recycles_its_blocks_and_holds_the_window():
    kv = KVBlocks(small_plan(SLIDING_ONLY, n_ctx=64, n_slots=1, max_write=8))
    device = Device(kv.plan)
    ring = kv.plan.pool(SLIDING).table_length
    seq = admitted(kv, list(range(10)), max_tokens=50)
    prefill(kv, device, seq)
    seen = set()
    for token in range(50, 99):
        decode(kv, device, seq, [token])
        seen.update(seq.tables[SLIDING])
        assert kv.stats().pools[SLIDING].in_use <= ring
        assert device.holds_history(seq, seq.n_committed)
    assert len(seen) > ring  # blocks came and went through the ring's entries
    check_invariants(kv, [seq])


def test_speculative_writes_past_the_accepted_tokens_are_written_again():
    kv = KVBlocks(small_plan(MIXED, max_write=8))
    device = Device(kv.plan)
    seq = admitted(kv, list(range(6)), max_tokens=20)
    prefill(kv, device, seq)
    kv.commit(seq, 6, [40])
    # The last token and 5 drafts; 1 draft accepted and a token sampled after it.
    assert kv.grow(seq, 6, 12)
    device.write(seq, 6, [40, 41, 90, 91, 92, 93])
    kv.commit(seq, 8, [41, 42])
    assert not kv.grow(seq, 8, 10)  # the blocks are there; the stale drafts are overwritten
    device.write(seq, 8, [42, 43])
    kv.commit(seq, 9, [43])
    assert seq.tokens[:10] == list(range(6)) + [40, 41, 42, 43]
    assert device.holds_history(seq, 9)
    # Only the first two blocks are full of committed tokens.
    assert len(seq.hashes) == 2


def test_writes_must_follow_the_committed_positions_within_max_write_and_the_reservation():
    kv = KVBlocks(small_plan(GLOBAL_ONLY, max_write=8))
    seq = admitted(kv, list(range(6)), max_tokens=2)  # 6 + 2 - 1 + 8 positions reserved
    for start, end in ((0, 9), (3, 2)):  # past max_write, backwards
        with pytest.raises(ValueError, match="not writable"):
            kv.grow(seq, start, end)
    kv.grow(seq, 0, 6)
    kv.commit(seq, 6, [1, 2])
    kv.grow(seq, 6, 8)
    kv.commit(seq, 8)
    with pytest.raises(ValueError, match=r"not writable: .* within the 15 positions reserved"):
        kv.grow(seq, 8, 16)
    with pytest.raises(ValueError, match="position 9 has no block"):
        kv.commit(seq, 10, [3, 4])
    with pytest.raises(ValueError, match="cannot commit 11 positions: 8 are committed, 10 tokens known"):
        kv.commit(seq, 11, [3, 4])
    assert len(seq.tokens) == 8
    kv.release(seq)
    with pytest.raises(RuntimeError, match="released"):
        kv.release(seq)


def test_an_empty_prompt_is_refused():
    with pytest.raises(RequestError, match="empty"):
        KVBlocks(small_plan()).admit([], 4)


# ----- everything at once -----


@pytest.mark.parametrize("cfg", [GLOBAL_ONLY, MIXED, SLIDING_ONLY], ids=["global", "mixed", "sliding"])
def test_random_traffic_keeps_every_invariant(cfg):
    """Admissions, prefill chunks, speculative decode with rollbacks, releases (some failed), under
    memory pressure and with shared prefixes; the fake device checks that every table and every
    cached block holds the tokens it stands for."""
    rng = random.Random(17)
    kv = KVBlocks(small_plan(cfg, n_ctx=48, n_slots=3, block_size=4, max_write=6, kv_cache_tokens=72))
    device = Device(kv.plan)
    stems = [[rng.randrange(3) for _ in range(30)] for _ in range(3)]
    prefix_of: dict[bytes, tuple[int, ...]] = {}  # every block hash seen, and the tokens up to its block's end
    live: list[tuple[SequenceBlocks, int]] = []  # (sequence, prompt + max_tokens)
    admitted_count = partly = copied = 0
    for _ in range(3000):
        action = rng.random()
        if action < 0.2 or not live:
            prompt = rng.choice(stems)[: rng.randrange(1, 30)] + [rng.randrange(3) for _ in range(rng.randrange(4))]
            max_tokens = rng.randrange(1, 12)
            try:
                seq = kv.admit(prompt, max_tokens, cache_prompt=rng.random() < 0.9)
            except KVCacheCapacityError:
                continue
            if seq is None:
                assert live, "an empty pool must admit any request that fits"
                continue
            copied += bool(seq.copies)
            device.copy(kv, seq)
            admitted_count += 1
            assert seq.n_cached < len(prompt)
            partly += seq.n_cached % 4 != 0
            assert device.holds_history(seq, seq.n_cached)
            live.append((seq, len(prompt) + max_tokens))
        elif action < 0.85:
            seq, limit = rng.choice(live)
            if seq.n_committed < len(seq.tokens) - 1:  # the prompt, chunk by chunk
                start = seq.n_committed
                end = min(len(seq.tokens), start + rng.randrange(1, 7))
                kv.grow(seq, start, end)
                device.write(seq, start, seq.tokens[start:end])
                kv.commit(seq, end, [rng.randrange(3)] if end == len(seq.tokens) else [])
            elif len(seq.tokens) < limit:  # the last token and drafts, some accepted, and a token sampled after them
                position = seq.n_committed
                drafts = [rng.randrange(3) for _ in range(rng.randrange(min(6, limit - len(seq.tokens))))]
                kv.grow(seq, position, position + 1 + len(drafts))
                device.write(seq, position, [seq.tokens[position], *drafts])
                n_kept = rng.randrange(len(drafts) + 1)
                kv.commit(seq, position + 1 + n_kept, drafts[:n_kept] + [rng.randrange(3)])
            else:
                live.remove((seq, limit))
                kv.release(seq, failed=rng.random() < 0.2)
            for j, block_hash in enumerate(seq.hashes):
                prefix_of.setdefault(block_hash, tuple(seq.tokens[: (j + 1) * 4]))
        else:
            seq, limit = live.pop(rng.randrange(len(live)))
            kv.release(seq, failed=rng.random() < 0.2)
        sequences = [seq for seq, _ in live]
        check_invariants(kv, sequences)
        for seq in sequences:
            assert device.holds_history(seq, seq.n_committed)
        for kind, pool in kv.pools.items():
            for block_hash, block in pool.by_hash.items():
                prefix = prefix_of[block_hash]
                start = len(prefix) - 4
                assert device.slots[kind][block] == [(p, prefix[p]) for p in range(start, len(prefix))]
            for block, (prefix_hash, tokens) in pool.partial_of.items():
                start = len(prefix_of[prefix_hash]) if prefix_hash else 0
                assert device.slots[kind][block][: len(tokens)] == [(start + i, token) for i, token in enumerate(tokens)]
    for seq, _ in live:
        kv.release(seq)
    check_invariants(kv, [])
    assert all(stats.in_use == 0 and stats.reserved == 0 for stats in kv.stats().pools.values())
    assert admitted_count > 100 and kv.stats().hit_tokens > 0 and partly > 10 and copied > 10
