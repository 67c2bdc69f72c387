"""Automatic prefix reuse: a request that starts with tokens a free slot's KV still holds prefills
only the rest, and its logits equal those of prefilling the whole prompt within llama.cpp's own
noise (the teacher-forced bound: KL <= 0.01), with the same argmax."""

import numpy as np
import pytest

import rz
from rz.buckets import Buckets
from rz.engine import Engine
from rz.generation import GenerationRequest
from rz.model_files import gemma3_270m_path, smollm2_135m_path
from rz.request import FinishReason, RequestOptions
from oracle import MAX_MEAN_KL, kl_divergence

N_CTX = 1024


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def llm(request):
    path = {"smollm2": smollm2_135m_path, "gemma3": gemma3_270m_path}[request.param]()
    return rz.LLM(path, n_ctx=N_CTX, max_batch=2)


@pytest.fixture
def engine(llm):
    # Chunks of at least 32 tokens, so that both prefills take the same matmul paths.
    return Engine(llm.model, llm.tokenizer, N_CTX, n_slots=2, buckets=Buckets.for_context(N_CTX, smallest=32))


def text_ids(llm, n_tokens: int, seed: int) -> list[int]:
    """n_tokens of a made-up text: ordinary tokens, different for each seed."""
    rng = np.random.default_rng(seed)
    words = "river mill path willow water meadow heron garden bread market night wind owl stone".split()
    ids = []
    while len(ids) < n_tokens:
        ids += llm.tokenize(" " + " ".join(rng.choice(words, 8)), add_bos=False)
    return ids[:n_tokens]


def admit(engine: Engine, ids: list[int], cache_prompt: bool = True):
    """Prefill ids into a slot and end the request there (its slot keeps the prompt's KV):
    (last position's logits, prompt tokens taken from the cache)."""
    sequence = engine.new_sequence(GenerationRequest(tuple(ids), RequestOptions(max_tokens=1, cache_prompt=cache_prompt)))
    admission = engine.begin_admission(sequence)
    while not admission.prefilled:
        engine.prefill_chunk(admission)
    logits = np.asarray(admission.logits)[0]
    engine.complete_admission(admission)
    sequence.finish(FinishReason.LENGTH)
    engine.release(sequence)
    return logits, sequence.n_cached


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


def test_cache_prompt_false_prefills_the_whole_prompt(llm, engine):
    prompt = [llm.tokenizer.bos_id] + text_ids(llm, 20, seed=7)
    admit(engine, prompt)
    assert admit(engine, prompt, cache_prompt=False)[1] == 0


def test_a_sliding_window_model_refuses_a_prefix_whose_ring_has_wrapped(llm, engine):
    window = llm.config.sliding_window
    if not window:
        pytest.skip("a model without sliding-window layers never wraps a ring buffer")
    held = [llm.tokenizer.bos_id] + text_ids(llm, window + 40, seed=8)
    admit(engine, held)
    prompt = held + text_ids(llm, 10, seed=9)
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
