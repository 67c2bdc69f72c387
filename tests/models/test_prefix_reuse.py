"""Automatic prefix reuse: a request that starts with tokens a row of the KV cache holds (a free
row's, or a running sequence's) prefills only the rest, and its logits equal those of prefilling
the whole prompt within llama.cpp's own noise (the teacher-forced bound: KL <= 0.01), with the
same argmax."""

import numpy as np
import pytest

import rz
from rz import kv_cache
from rz.buckets import Buckets
from rz.engine import Engine
from rz.model_files import gemma3_270m_path, smollm2_135m_path
from oracle import MAX_MEAN_KL, kl_divergence
from support.admission import admit, end, start

N_CTX = 1024


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def llm(request):
    path = {"smollm2": smollm2_135m_path, "gemma3": gemma3_270m_path}[request.param]()
    return rz.LLM(path, n_ctx=N_CTX, max_batch=2)


@pytest.fixture
def engine(llm):
    # Chunks of at least 32 tokens, so that both prefills take the same matmul paths, and at most 128,
    # so that Gemma 3's rings (its window: 512) hold 768 positions, fewer than the context.
    return Engine(llm.model, llm.tokenizer, N_CTX, n_slots=2, buckets=Buckets.for_context(N_CTX, smallest=32, largest=128))


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


def test_a_chat_turn_prefills_only_what_follows_the_previous_prompt(llm, engine):
    first = [llm.tokenizer.bos_id] + text_ids(llm, 60, seed=1)
    second = first + text_ids(llm, 40, seed=2)
    admit(engine, first)
    logits, n_cached = admit(engine, second)
    assert n_cached == len(first)
    assert_same_logits(engine, second, logits)


def test_requests_sharing_a_system_prompt_reuse_it(llm, engine):
    system = [llm.tokenizer.bos_id] + text_ids(llm, 50, seed=3)
    admit(engine, system + text_ids(llm, 20, seed=4))
    question = system + text_ids(llm, 30, seed=5)
    logits, n_cached = admit(engine, question)
    assert len(system) <= n_cached < len(question)
    assert_same_logits(engine, question, logits)


def test_a_prompt_that_is_a_strict_prefix_of_the_cached_tokens_recomputes_its_last_token(llm, engine):
    held = [llm.tokenizer.bos_id] + text_ids(llm, 80, seed=6)
    admit(engine, held)
    prompt = held[:33]
    logits, n_cached = admit(engine, prompt)
    assert n_cached == len(prompt) - 1
    assert_same_logits(engine, prompt, logits)


def test_a_request_copies_the_prefix_another_row_holds_and_that_row_keeps_its_own(llm, engine):
    system = [llm.tokenizer.bos_id] + text_ids(llm, 50, seed=10)
    first = system + text_ids(llm, 20, seed=11)
    admit(engine, first)
    question = system + text_ids(llm, 30, seed=12)
    logits, sequence = start(engine, question)
    assert len(system) <= sequence.n_cached < len(question)
    end(engine, sequence)
    assert_same_logits(engine, question, logits)
    # The question went into the empty row, and so did the whole prefill that checked it (it
    # repeats that row's tokens): the first prompt's row was not evicted.
    continued = first + text_ids(llm, 10, seed=13)
    logits, n_cached = admit(engine, continued)
    assert n_cached == len(first)
    assert_same_logits(engine, continued, logits)


def test_the_choices_of_one_request_share_its_prompt_prefill(llm, engine):
    """n = 2: the second copy of a prompt, admitted while the first runs, copies the first's row
    and computes only the last prompt token again."""
    prompt = [llm.tokenizer.bos_id] + text_ids(llm, 70, seed=14)
    computed = engine.prompt_tokens_computed
    _, first = start(engine, prompt)
    logits, second = start(engine, prompt)
    assert (first.n_cached, second.n_cached) == (0, len(prompt) - 1)
    assert engine.prompt_tokens_computed - computed == len(prompt) + 1
    assert first.slot != second.slot
    end(engine, first)
    end(engine, second)
    assert_same_logits(engine, prompt, logits)


def test_the_least_recently_used_row_is_evicted(llm, engine):
    prompts = [[llm.tokenizer.bos_id] + text_ids(llm, 40, seed=seed) for seed in (15, 16, 17)]
    admit(engine, prompts[0])
    admit(engine, prompts[1])
    assert admit(engine, prompts[0] + [prompts[1][5]])[1] == len(prompts[0])  # prompts[0]'s row is used again
    admit(engine, prompts[2])  # takes the least recently used row: prompts[1]'s
    assert admit(engine, prompts[1])[1] < len(prompts[1]) - 1  # its row is gone (but for a shared BOS)
    assert admit(engine, prompts[2])[1] == len(prompts[2]) - 1


def test_cache_prompt_false_prefills_the_whole_prompt(llm, engine):
    prompt = [llm.tokenizer.bos_id] + text_ids(llm, 20, seed=7)
    admit(engine, prompt)
    assert admit(engine, prompt, cache_prompt=False)[1] == 0


def test_a_sliding_window_model_reuses_a_prefix_past_its_window_while_its_ring_holds_it(llm, engine):
    """A ring that has wrapped still holds the window before what it was last written at: a prompt
    continuing its tokens reuses them all; one that leaves them too far before its end needs keys
    the ring has overwritten, and is prefilled whole."""
    window = llm.config.sliding_window
    if not window:
        pytest.skip("a model without sliding-window layers never wraps a ring of blocks")
    held = [llm.tokenizer.bos_id] + text_ids(llm, 850, seed=8)
    slots, reach = kv_cache.ring(llm.config, N_CTX, engine.block_size, engine.max_write)
    assert slots < len(held) and window + 10 + reach < len(held)
    admit(engine, held)
    continued = held + text_ids(llm, 10, seed=9)
    logits, n_cached = admit(engine, continued)
    assert n_cached == len(held)
    assert_same_logits(engine, continued, logits)
    prompt = held[: window + 10] + text_ids(llm, 10, seed=9)
    logits, n_cached = admit(engine, prompt)
    assert n_cached == 0
    assert_same_logits(engine, prompt, logits)


def test_a_second_chat_turn_in_llm_reports_its_cached_tokens(llm):
    messages = [{"role": "user", "content": "Name a river."}]
    first = llm.chat(messages, max_tokens=4, temperature=0.0)
    assert first.usage["cached_tokens"] == 0
    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a mountain?"}]
    second = llm.chat(messages, max_tokens=4, temperature=0.0)
    assert 0 < second.usage["cached_tokens"] < second.usage["prompt_tokens"]
