"""Prefix reuse through the KV cache's blocks, on tiny models whose F16 weights take the f32 XLA
path: mapping a prefix's cached blocks gives the logits a whole prefill gives, to float
rounding, for each cache type and through a tiny Gemma 3's rings of blocks (its window: 48
positions), and generation with reuse gives the tokens generation without it gives, under
eviction and 16 streams at once."""

import numpy as np
import pytest

import rz
from rz.buckets import Buckets
from rz.engine import Engine
from rz.kv_cache import CacheTypes
from support.admission import admit, end, start
from tiny_models import N_VOCAB, write_tiny_model

N_CTX = 128
WORDS = np.arange(N_VOCAB - 44, N_VOCAB)  # the tiny vocabulary's word tokens
# Summation order differs between a reused prefix's tail chunk and a whole prefill.
ATOL = 1e-4


def words(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).choice(WORDS, n)]


WINDOW = 48


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def path(request, tmp_path_factory):
    overrides = {"sliding_window": WINDOW} if request.param == "gemma3" else {}
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model.gguf", request.param, "F16", **overrides)


@pytest.fixture(scope="module")
def llm(path):
    return rz.LLM(path, n_ctx=N_CTX, max_batch=16, compilation_cache=False)


@pytest.fixture(params=["f32", "q8_0"])
def engine(llm, request):
    if request.param == "q8_0" and llm.config.head_dim % 32:
        pytest.skip("a q8_0 cache needs heads of a multiple of 32 (the tiny Gemma 3's)")
    types = CacheTypes(request.param, request.param)
    # Blocks and chunks of 16: the tiny Gemma 3's rings hold 80 positions (five blocks), fewer than the context.
    buckets = Buckets.for_context(N_CTX, smallest=16, largest=16)
    return Engine(llm.model, llm.tokenizer, N_CTX, n_slots=2, buckets=buckets, cache_types=types, block_size=16)


def prompt_of(llm, *pieces: list[int]) -> list[int]:
    return [llm.tokenizer.bos_id] + [t for piece in pieces for t in piece]


def assert_as_prefilled_whole(engine: Engine, ids: list[int], reused: np.ndarray) -> None:
    fresh, n_cached = admit(engine, ids, cache_prompt=False)
    assert n_cached == 0
    np.testing.assert_allclose(reused, fresh, atol=ATOL, rtol=0)


def test_a_prompt_continuing_a_sequence_reuses_it_exactly(llm, engine):
    """Past a ring that has wrapped, too: the blocks it moved past stay cached."""
    held = prompt_of(llm, words(WINDOW + 52, seed=1))
    admit(engine, held)
    prompt = held + words(5, seed=2)
    logits, n_cached = admit(engine, prompt)
    assert n_cached == len(held) == 101  # six full blocks of 16, and the partly written seventh
    assert_as_prefilled_whole(engine, prompt, logits)


def test_a_prompt_diverging_in_a_partly_written_block_reuses_the_tokens_it_shares_exactly(llm, engine):
    """The block's slots past the shared tokens hold the other sequence's later positions (here
    104..106): the prompt's chunk writes over those it reaches, and attention masks the rest."""
    held = prompt_of(llm, words(WINDOW + 52, seed=1))
    tail = words(6, seed=6)
    admit(engine, held + tail)  # its seventh block holds positions 96..106
    prompt = held + tail[:3] + [t for t in words(3, seed=7) if t != tail[3]][:2]
    logits, n_cached = admit(engine, prompt)
    assert n_cached == len(held) + 3 == 104
    assert_as_prefilled_whole(engine, prompt, logits)


@pytest.mark.parametrize("n_system, n_after", [(20, 8), (WINDOW + 4, 8), (WINDOW + 4, 40)])
def test_a_shared_prefix_is_mapped_from_another_sequence_exactly(llm, engine, n_system, n_after):
    """Past the window, too, and after the other sequence's rings wrapped past the shared part."""
    system = prompt_of(llm, words(n_system, seed=3))
    admit(engine, system + words(n_after, seed=4))
    question = system + words(6, seed=5)
    logits, sequence = start(engine, question)
    end(engine, sequence)
    # The system prompt's full blocks mapped, and its rest copied from the other sequence's block
    # after them (full or kept partly written: its own tokens follow the system prompt's).
    assert sequence.n_cached == len(system)
    assert_as_prefilled_whole(engine, question, logits)


def test_a_running_sequence_s_block_is_copied_for_the_tokens_a_prompt_shares_with_it(llm, engine):
    """The shared prefix's full blocks are mapped and its 5 tokens past them copied from the block
    the running sequence goes on writing (with its own tokens after them)."""
    system = prompt_of(llm, words(WINDOW + 4, seed=3))
    _, running = start(engine, system + words(8, seed=4))
    question = system + words(6, seed=5)
    logits, sequence = start(engine, question)
    assert sequence.n_cached == len(system) == 53
    end(engine, sequence)
    end(engine, running)
    assert_as_prefilled_whole(engine, question, logits)


def test_the_second_choice_of_a_prompt_maps_the_first_while_it_runs(llm, engine):
    prompt = prompt_of(llm, words(48, seed=6))
    computed = engine.prompt_tokens_computed
    first_logits, first = start(engine, prompt)
    logits, second = start(engine, prompt)
    assert (first.n_cached, second.n_cached) == (0, len(prompt) - 1)
    assert engine.prompt_tokens_computed - computed == len(prompt) + 1
    np.testing.assert_allclose(logits, first_logits, atol=ATOL, rtol=0)


def generate(llm, prompts: list[list[int]], cache_prompt: bool) -> list:
    return llm.generate(prompts, max_tokens=6, temperature=0.0, ignore_eos=True, cache_prompt=cache_prompt)


def test_under_eviction_every_output_is_the_one_without_reuse(path):
    """Three system prompts of more than a block (64 positions), two questions each in turn, one
    request at a time through pools of two blocks per kind (one slot of a context of two blocks):
    a question maps its system prompt's block cached by the one before, which the next system
    prompt evicts, and no output changes."""
    llm = rz.LLM(path, n_ctx=N_CTX, max_batch=2, compilation_cache=False)
    systems = [words(70, seed=10 + i) for i in range(3)]
    prompts = [prompt_of(llm, systems[i // 2 % 3], words(4 + i % 5, seed=20 + i)) for i in range(12)]
    reused = [generate(llm, [p], cache_prompt=True)[0] for p in prompts]
    alone = [generate(llm, [p], cache_prompt=False)[0] for p in prompts]
    assert [c.token_ids for c in reused] == [c.token_ids for c in alone]
    # A new system prompt copies the BOS token from the first block of the one before it; in pools
    # this small, a question has no block to spare for a copy of its system prompt's last 7 tokens.
    assert [c.usage["cached_tokens"] for c in reused] == [0, 64] + [1, 64] * 5


def test_sixteen_streams_with_overlapping_prefixes_generate_as_each_alone(llm):
    """Prompts sharing one, two or no blocks of 64 positions."""
    system = words(120, seed=30)
    prompts = [prompt_of(llm, system[: 40 + 24 * (i % 4)], words(3 + i % 5, seed=40 + i % 6)) for i in range(16)]
    together = generate(llm, prompts, cache_prompt=True)
    alone = generate(llm, prompts, cache_prompt=False)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert sum(c.usage["cached_tokens"] for c in together) > 0
