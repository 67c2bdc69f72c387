"""Automatic prefix reuse: a request whose prompt starts with the tokens of full blocks the KV
cache holds (a finished sequence's, or a running one's) maps them, takes over a finished
sequence's partly written block after them as far as its tokens match, and prefills only the rest,
and its logits equal those of prefilling the whole prompt within llama.cpp's own noise (the
teacher-forced bound: KL <= 0.01), with the same argmax."""

import numpy as np
import pytest

import rz
from rz.buckets import Buckets
from rz.engine import Engine
from rz.model_files import gemma3_270m_path, smollm2_135m_path
from rz_kernels.quantized_matmul import CPU_TILES_MAX_M
from oracle import MAX_MEAN_KL, kl_divergence
from support.admission import admit, end, start

N_CTX = 1024


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def llm(request):
    path = {"smollm2": smollm2_135m_path, "gemma3": gemma3_270m_path}[request.param]()
    return rz.LLM(path, n_ctx=N_CTX, max_batch=2)


@pytest.fixture
def engine(llm):
    # Every chunk 128 tokens, more than CPU_TILES_MAX_M, so that a reused prefix's short tail and a
    # whole prompt take the same matmul paths (this tests the blocks, not the kernels' roundings),
    # and Gemma 3's rings (its window: 512) hold 768 positions, fewer than the context.
    assert CPU_TILES_MAX_M < 128
    return Engine(llm.model, llm.tokenizer, N_CTX, n_slots=2, buckets=Buckets.for_context(N_CTX, smallest=128, largest=128))


def text_ids(llm, n_tokens: int, seed: int) -> list[int]:
    """n_tokens of a made-up text: ordinary tokens, different for each seed."""
    rng = np.random.default_rng(seed)
    words = "river mill path willow water meadow heron garden bread market night wind owl stone".split()
    ids = []
    while len(ids) < n_tokens:
        ids += llm.tokenize(" " + " ".join(rng.choice(words, 8)), add_bos=False)
    return ids[:n_tokens]


def assert_same_logits(engine: Engine, ids: list[int], reused: np.ndarray) -> None:
    fresh, n_cached = admit(engine, ids, cache_prompt=False)
    assert n_cached == 0
    # Not bit-exact: on x86 a K-quant prompt's matmuls round activations to int8 as llama.cpp's do,
    # and the reused chunk's attention sums in another order, so a few roundings flip (Gemma 3:
    # NMSE 7.7e-4, KL 2.9e-3 here).
    kl = float(kl_divergence(fresh, reused))
    assert kl <= MAX_MEAN_KL, f"KL {kl:.2e} > {MAX_MEAN_KL}"
    assert np.argmax(reused) == np.argmax(fresh)


def full_blocks(engine: Engine, n_tokens: int) -> int:
    """The positions of the full blocks before a prompt's last token: what a prompt can map."""
    return (n_tokens - 1) // engine.block_size * engine.block_size


def test_a_chat_turn_prefills_only_what_follows_the_previous_prompt(llm, engine):
    """Its full blocks are mapped, and its partly written last block (positions 128..140) is taken over."""
    first = [llm.tokenizer.bos_id] + text_ids(llm, 140, seed=1)
    second = first + text_ids(llm, 40, seed=2)
    admit(engine, first)
    logits, n_cached = admit(engine, second)
    assert n_cached == len(first) == 141
    assert_same_logits(engine, second, logits)


def test_requests_sharing_a_system_prompt_reuse_it(llm, engine):
    system = [llm.tokenizer.bos_id] + text_ids(llm, 70, seed=3)
    admit(engine, system + text_ids(llm, 20, seed=4))
    question = system + text_ids(llm, 30, seed=5)
    logits, n_cached = admit(engine, question)
    # A full block, and the system prompt's last 7 tokens copied from the first request's partly
    # written block (too few of its 27 tokens to take it over).
    assert n_cached == len(system) == 71
    assert_same_logits(engine, question, logits)


def test_a_prompt_that_is_a_strict_prefix_of_the_cached_tokens_recomputes_its_last_token(llm, engine):
    held = [llm.tokenizer.bos_id] + text_ids(llm, 160, seed=6)
    admit(engine, held)
    prompt = held[:129]
    logits, n_cached = admit(engine, prompt)
    assert n_cached == len(prompt) - 1 == full_blocks(engine, len(prompt))
    assert_same_logits(engine, prompt, logits)


def test_the_choices_of_one_request_share_its_prompt_prefill(llm, engine):
    """n = 2: the second copy of a prompt, admitted while the first runs, maps the first's full
    blocks and computes only the rest."""
    prompt = [llm.tokenizer.bos_id] + text_ids(llm, 128, seed=14)
    computed = engine.prompt_tokens_computed
    _, first = start(engine, prompt)
    logits, second = start(engine, prompt)
    assert (first.n_cached, second.n_cached) == (0, len(prompt) - 1)
    assert engine.prompt_tokens_computed - computed == len(prompt) + 1
    assert first.slot != second.slot
    end(engine, first)
    end(engine, second)
    assert_same_logits(engine, prompt, logits)


def test_the_least_recently_used_blocks_are_evicted(llm):
    """A pool of four blocks, one request at a time, each reserving all four: a prompt's cached
    blocks serve the next prompt that starts with them until newer prompts have needed them."""
    engine = Engine(llm.model, llm.tokenizer, N_CTX, n_slots=1, kv_cache_tokens=256,
                    buckets=Buckets.for_context(N_CTX, smallest=32, largest=128))
    prompts = [[llm.tokenizer.bos_id] + text_ids(llm, 129, seed=seed) for seed in (15, 16, 17)]
    admit(engine, prompts[0])  # caches its two full blocks and keeps its partly written third
    assert admit(engine, prompts[0] + [prompts[1][5]])[1] == 130
    admit(engine, prompts[1])  # takes the free block, then prompts[0]'s third and second
    assert admit(engine, prompts[0] + [prompts[1][5]])[1] == 64  # its first block is still cached
    admit(engine, prompts[2])
    assert admit(engine, prompts[2] + [5])[1] == 130
    assert admit(engine, prompts[1] + [5])[1] == 1  # evicted: only the BOS token, copied from another's first block


def test_cache_prompt_false_prefills_the_whole_prompt(llm, engine):
    prompt = [llm.tokenizer.bos_id] + text_ids(llm, 80, seed=7)
    admit(engine, prompt)
    assert admit(engine, prompt, cache_prompt=False)[1] == 0
    assert admit(engine, prompt)[1] == len(prompt) - 1


def test_a_sliding_window_model_reuses_a_prefix_past_its_window(llm, engine):
    """Blocks a sliding layer's ring has moved past stay cached: a prompt continuing a long text
    maps them, and so does one that shares only the text's first part (it needs the ring's first
    blocks, long overwritten in the ring of the sequence that wrote them)."""
    window = llm.config.sliding_window
    if not window:
        pytest.skip("a model without sliding-window layers never wraps a ring of blocks")
    held = [llm.tokenizer.bos_id] + text_ids(llm, 850, seed=8)
    admit(engine, held)
    # Both mapped before any fresh prefill for comparison: a pool of two rings evicts under those.
    prompt = held[: window + 10] + text_ids(llm, 10, seed=9)
    prompt_logits, n_cached = admit(engine, prompt)
    # 8 blocks, and 10 tokens copied from the cached ninth
    assert n_cached == window + 10 == 522
    continued = held + text_ids(llm, 10, seed=9)
    logits, n_cached = admit(engine, continued)
    assert n_cached == len(held) == 851  # 13 full blocks and the partly written 14th
    assert_same_logits(engine, continued, logits)
    assert_same_logits(engine, prompt, prompt_logits)


def test_a_second_chat_turn_in_llm_reports_its_cached_tokens(llm):
    messages = [{"role": "user", "content": "Name a river. " + llm.detokenize(text_ids(llm, 80, seed=11))}]
    first = llm.chat(messages, max_tokens=4, temperature=0.0)
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a mountain?"}]
    second = llm.chat(messages, max_tokens=4, temperature=0.0)
    assert 64 <= second.usage["cached_tokens"] < second.usage["prompt_tokens"]
