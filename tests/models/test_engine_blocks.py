"""The engine on its block allocator (rz.kv_blocks), on a tiny llama: a request that could never
fit is refused at once with its specific error, one that cannot fit now waits for blocks and
then runs as it would alone, and cancelled, failed or finished requests give every block back."""

import numpy as np
import pytest

import rz
from rz.buckets import Buckets
from rz.engine import Engine
from rz.generation import GenerationRequest
from rz.kv_blocks import KVCacheCapacityError
from rz.request import FinishReason, RequestOptions
from rz.scheduler import Scheduler
from tiny_models import N_VOCAB, write_tiny_model

N_CTX = 256
WORDS = np.arange(N_VOCAB - 44, N_VOCAB)


def words(n: int, seed: int) -> tuple[int, ...]:
    return tuple(int(t) for t in np.random.default_rng(seed).choice(WORDS, n))


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model.gguf", "llama", "F16")
    return rz.LLM(path, n_ctx=N_CTX, max_batch=2, compilation_cache=False)


def small_engine(llm, kv_cache_tokens: int) -> Engine:
    """Two slots over a pool of kv_cache_tokens positions, in blocks of 64; chunks of 64 (so a
    request reserves its prompt and max_tokens plus one chunk)."""
    return Engine(llm.model, llm.tokenizer, N_CTX, n_slots=2, kv_cache_tokens=kv_cache_tokens,
                  buckets=Buckets.for_context(N_CTX, smallest=64, largest=64))


def request(prompt, max_tokens: int, **options) -> GenerationRequest:
    return GenerationRequest(prompt, RequestOptions.from_flat(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **options))


def assert_every_block_back(engine: Engine) -> None:
    for kind, pool in engine.blocks.stats().pools.items():
        assert (pool.in_use, pool.reserved, pool.free + pool.cached) == (0, 0, pool.total), kind


def test_a_request_larger_than_the_whole_pool_is_refused_with_its_error(llm):
    engine = small_engine(llm, kv_cache_tokens=128)
    with pytest.raises(KVCacheCapacityError, match="more than the 128 the whole cache holds; .*kv_cache_tokens"):
        Scheduler(engine).add(request(words(100, seed=1), 40))
    # Within the pool, it runs (the reservation past the context's end is cut at the pool's size).
    scheduler = Scheduler(engine)
    sequence = scheduler.add(request(words(100, seed=1), 28))
    list(scheduler.drain())
    assert len(sequence.output_ids) == 28 and sequence.finish_reason is FinishReason.LENGTH
    assert_every_block_back(engine)


def test_a_request_waits_for_blocks_and_then_runs_as_it_would_alone(llm):
    """Pools of four blocks, two slots: each request reserves three blocks (prompt, output and one
    chunk), so the second waits, its slot free, until the first has finished."""
    engine = small_engine(llm, kv_cache_tokens=256)
    prompts = [words(60, seed=2), words(70, seed=3)]
    alone = [llm.generate([p], max_tokens=40, temperature=0.0, ignore_eos=True)[0].token_ids for p in prompts]
    scheduler = Scheduler(engine)
    first, second = (scheduler.add(request(p, 40)) for p in prompts)
    order = []
    for event in scheduler.drain():
        if event.sequence is second and not order:
            order.append(first.finish_reason)
    assert order == [FinishReason.LENGTH]  # the second's first token came after the first finished
    assert [first.output_ids, second.output_ids] == alone
    assert_every_block_back(engine)


def test_cancelled_and_failed_requests_give_every_block_back(llm):
    engine = small_engine(llm, kv_cache_tokens=512)
    scheduler = Scheduler(engine)
    running = [scheduler.add(request(words(90 + 10 * i, seed=4 + i), 30)) for i in range(3)]
    for _ in range(4):  # the first two admitted and decoding, the third waiting for a slot
        scheduler.step()
    assert running[0].output_ids and running[2].slot == -1
    scheduler.cancel(running[0])  # in a slot, with a decode call perhaps in flight
    scheduler.cancel(running[1], FinishReason.ERROR)  # as after a failed step: nothing it wrote stays cached
    list(scheduler.drain())
    assert running[2].finish_reason is FinishReason.LENGTH
    assert_every_block_back(engine)
    # Cancelled mid-prefill: its chunks so far stay cached, the blocks go back.
    long = engine.new_sequence(request(words(200, seed=9), 8))
    admission = engine.begin_admission(long)
    engine.prefill_chunk(admission)
    assert len(admission.chunks) > 1
    scheduler.cancel(long)
    assert_every_block_back(engine)
    assert engine.blocks.stats().pools[False].cached


def test_score_leaves_its_blocks_cached_for_the_prompt_that_follows(llm):
    engine = small_engine(llm, kv_cache_tokens=512)
    ids = words(150, seed=10)
    engine.score(list(ids))
    assert_every_block_back(engine)
    scheduler = Scheduler(engine)
    sequence = scheduler.add(request(ids + words(5, seed=11), 2))
    list(scheduler.drain())
    assert sequence.n_cached == len(ids)


def test_a_prompt_is_admitted_in_the_chunks_that_pad_least(llm):
    """A 134-token prompt runs as 128 + 8 positions, not one chunk of its 256-position bucket; a
    warm-up's context still asks for that context's chunk; a reused prefix's tail shrinks too."""
    engine = Engine(llm.model, llm.tokenizer, N_CTX, n_slots=2)
    ids = words(134, seed=12)
    admission = engine.begin_admission(engine.new_sequence(request(ids, 2)))
    assert admission.chunks == ((0, 128), (128, 8))
    while not admission.prefilled:
        engine.prefill_chunk(admission)
    engine.complete_admission(admission)
    warm_up = engine.begin_admission(engine.new_sequence(request((5,), 2)), context=N_CTX)
    assert warm_up.chunks == ((0, N_CTX),)
    engine.prefill_chunk(warm_up)
    engine.complete_admission(warm_up)
    for sequence in list(engine.active()):
        sequence.finish(FinishReason.LENGTH)
        engine.release(sequence)
    tail = engine.begin_admission(engine.new_sequence(request(ids + words(10, seed=13), 2)))
    assert tail.chunks == ((134, 16),)


def test_llm_takes_kv_cache_tokens_and_reports_the_pool(tmp_path):
    path = write_tiny_model(tmp_path / "model.gguf", "llama", "F16")
    llm = rz.LLM(path, n_ctx=N_CTX, max_batch=2, compilation_cache=False, kv_cache_tokens=192)
    with pytest.raises(KVCacheCapacityError):
        llm.generate(list(words(150, seed=12)), max_tokens=50)
    completion = llm.generate(list(words(150, seed=12)), max_tokens=8, temperature=0.0)
    assert len(completion.token_ids) <= 8
    summary = llm._current.plan.summary()
    assert "global 3 blocks = 192 tokens" in summary, summary
