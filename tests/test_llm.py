"""rz.LLM end to end on a real model: the API contract, errors, batching, seeds, streaming."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

import rz
from rz.errors import ContextOverflowError, RequestError
from rz.request import RequestOptions, SamplingParams
from rz.model_files import smollm2_135m_path

N_CTX = 256


@pytest.fixture(scope="module")
def llm():
    return rz.LLM(smollm2_135m_path(), n_ctx=N_CTX, max_batch=4)


def test_generate_returns_a_completion(llm):
    out = llm.generate("The capital of France is", max_tokens=8, temperature=0.0)
    assert isinstance(out, rz.Completion)
    assert len(out.token_ids) == out.usage["completion_tokens"] <= 8
    assert out.usage["prompt_tokens"] == len(llm.tokenize("The capital of France is"))
    assert out.finish_reason in ("stop", "length")
    assert out.text == llm.detokenize([t for t in out.token_ids if t not in llm.tokenizer.eog_ids])
    assert out.timings["decode_seconds"] >= 0 and out.timings["time_to_first_token_seconds"] > 0


# How far apart two logits may be for decode and a teacher-forced pass to rank them differently:
# decode steps quantize activations to int8 for quantized weights (as llama.cpp does), prompts keep
# them f32. Measured: with the f16 cache, this test's prompt has a 0.09 near-tie that decode breaks
# the other way.
NEAR_TIE = 0.25


def test_greedy_tokens_are_the_argmax_of_scoring_the_same_sequence(llm):
    """Prefill + step-by-step decode chooses what one teacher-forced pass says is most likely,
    except at a near-tie of the teacher-forced logits."""
    prompt = llm.tokenize("In a hole in the ground there lived")
    out = llm.generate(prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
    logits = llm.score(prompt + out.token_ids)[len(prompt) - 1 : -1]
    chosen = logits[np.arange(len(out.token_ids)), out.token_ids]
    assert np.all(chosen >= logits.max(axis=-1) - NEAR_TIE), (chosen, logits.max(axis=-1))
    assert np.mean(logits.argmax(axis=-1) == out.token_ids) >= 0.75


def test_score_shape(llm):
    ids = llm.tokenize("one two three four")
    logits = llm.score(ids)
    assert logits.shape == (len(ids), llm.config.n_vocab) and logits.dtype == np.float32


def test_a_batch_gives_each_prompt_what_it_gets_alone(llm):
    prompts = ["Hello, my name is", "1, 2, 3, 4,", "The weather today", "def fibonacci(n):"]
    alone = [llm.generate(p, max_tokens=10, temperature=0.0, ignore_eos=True).token_ids for p in prompts]
    together = llm.generate(prompts, max_tokens=10, temperature=0.0, ignore_eos=True)
    assert [c.token_ids for c in together] == alone


def test_sequences_joining_and_leaving_between_chained_calls_get_what_they_get_alone(llm):
    """Decode calls are launched ahead while the slots keep their sequences (Engine.decode): lengths
    that end mid-call and more prompts than slots make sequences leave, and others join their
    slots, while a call is in flight. Each must still get exactly its own tokens."""
    prompts = ["Hello, my name is", "1, 2, 3, 4,", "The weather today", "def fibonacci(n):", "Once upon", "Red, green,"]
    lengths = [3, 22, 9, 17, 5, 13]
    sampling = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=5)
    alone = [llm.generate(p, max_tokens=n, ignore_eos=True, **sampling).token_ids for p, n in zip(prompts, lengths)]
    # generate() gives a batch one max_tokens; the engine takes one per request.
    requests = [llm._request(p, RequestOptions(n, SamplingParams(**sampling), ignore_eos=True)) for p, n in zip(prompts, lengths)]
    together = llm._run(requests)
    assert [c.token_ids for c in together] == alone
    assert all(len(tokens) == n for tokens, n in zip(alone, lengths))
    assert not llm._current.active()


def test_more_prompts_than_slots_are_all_served(llm):
    prompts = [f"Count to {n}:" for n in range(6)]
    outs = llm.generate(prompts, max_tokens=4, temperature=0.0, ignore_eos=True)
    assert [len(o.token_ids) for o in outs] == [4] * 6


def test_same_seed_same_text_and_different_seeds_differ(llm):
    # Without prefix reuse: a prompt whose KV comes from the cache (here, an earlier test's
    # "Once upon" and the " a time" it generated, computed by decode steps) has logits equal to a
    # whole prefill's only to rounding, and sampling over the whole vocabulary amplifies that.
    options = dict(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, ignore_eos=True, cache_prompt=False)
    first = llm.generate("Once upon a time", seed=7, **options)
    again = llm.generate("Once upon a time", seed=7, **options)
    assert first.token_ids == again.token_ids
    others = {tuple(llm.generate("Once upon a time", seed=s, **options).token_ids) for s in range(4)}
    assert len(others) > 1


def test_stream_concatenates_to_generate(llm):
    options = dict(max_tokens=20, temperature=0.0)
    pieces = list(llm.stream("Write a haiku about the sea:", **options))
    assert "".join(pieces) == llm.generate("Write a haiku about the sea:", **options).text


def test_stop_string_is_never_emitted(llm):
    full = llm.generate("1, 2, 3, 4, 5,", max_tokens=20, temperature=0.0, ignore_eos=True).text
    assert " 7" in full
    out = llm.generate("1, 2, 3, 4, 5,", max_tokens=20, temperature=0.0, stop=[" 7"])
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(" 7")]
    streamed = "".join(llm.stream("1, 2, 3, 4, 5,", max_tokens=20, temperature=0.0, stop=[" 7"]))
    assert streamed == out.text


def test_stop_token_ids_and_max_tokens(llm):
    greedy = llm.generate("1, 2, 3,", max_tokens=6, temperature=0.0, ignore_eos=True)
    assert greedy.finish_reason == "length" and len(greedy.token_ids) == 6
    stopped = llm.generate("1, 2, 3,", max_tokens=6, temperature=0.0, stop_token_ids=[greedy.token_ids[2]])
    assert stopped.finish_reason == "stop" and stopped.token_ids == greedy.token_ids[:3]


def test_logprobs(llm):
    out = llm.generate("The capital of France is", max_tokens=3, temperature=0.0, logprobs=3)
    assert len(out.logprobs) == len(out.token_ids)
    for entry, token in zip(out.logprobs, out.token_ids):
        assert entry["token"] == token and entry["logprob"] <= 0
        assert len(entry["top"]) == 3 and entry["top"][0][0] == token  # greedy picks the most likely


def test_chat_uses_the_template(llm):
    ids = llm.chat_prompt_ids([{"role": "user", "content": "Hi"}])
    (im_start,) = llm.tokenize("<|im_start|>", special=True)
    assert ids.count(im_start) == 3  # system (from the template's default), user, assistant
    # Control tokens render as nothing, as in llama.cpp's detokenizer.
    assert llm.detokenize(ids).endswith("user\nHi\nassistant\n")
    out = llm.chat([{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0.0)
    assert out.usage["completion_tokens"] >= 1


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"top_k": -3}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_values_are_rejected(llm, options, message):
    options = {"max_tokens": 4} | options
    with pytest.raises(RequestError, match=message):
        llm.generate("Hello", **options)


def test_empty_prompt_is_rejected(llm):
    for empty in ("", []):
        with pytest.raises(RequestError, match="empty"):
            llm.generate(empty, max_tokens=4)


def test_prompt_over_the_context_is_rejected_before_compute(llm):
    long_prompt = [llm.tokenize("word")[0]] * (N_CTX - 3)
    with pytest.raises(ContextOverflowError, match="context size 256"):
        llm.generate(long_prompt, max_tokens=10)
    with pytest.raises(ContextOverflowError):
        llm.generate("hello", max_tokens=N_CTX)


def test_token_ids_outside_the_vocabulary_are_rejected(llm):
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([1, 2, llm.config.n_vocab + 5], max_tokens=2)


def test_a_session_does_not_recompile_after_warm_up(llm):
    llm.generate(["a b c", "d e f g h"], max_tokens=4, temperature=0.0)
    seen = llm.compiled_variants()
    llm.generate(["x y", "the quick brown fox"], max_tokens=6, temperature=0.0)
    assert llm.compiled_variants() == seen


def test_warm_up_compiles_what_a_session_meets(llm):
    llm.warm_up(2)
    seen = llm.compiled_variants()
    llm.generate(["x y", "a much longer prompt than that " * 9], max_tokens=3, temperature=0.0, logprobs=1)
    assert llm.compiled_variants() == seen


def test_one_kv_cache_sized_for_the_largest_batch_so_far(llm):
    """A larger batch replaces the engine (and its cache); a smaller one runs on its first slots."""
    llm.generate(["a b", "c d", "e f"], max_tokens=2, temperature=0.0)
    engine = llm._current
    assert engine.n_slots == 4
    single = llm.generate("a b", max_tokens=2, temperature=0.0, ignore_eos=True)
    assert llm._current is engine and single.usage["completion_tokens"] == 2


def test_a_larger_batch_frees_the_engine_it_replaces(monkeypatch):
    """The retired engine (its KV cache) is gone before the larger one is built, with the automatic
    collector off: the compiled steps are module-level functions, so nothing holds it in a cycle."""
    import gc
    import weakref

    import rz.llm

    llm = rz.LLM(smollm2_135m_path(), n_ctx=64, max_batch=2)
    llm.generate("a b", max_tokens=2, temperature=0.0)
    retired = weakref.ref(llm._current)
    alive_at_construction = []

    class Watched(rz.llm.Engine):
        def __init__(self, *args, **kwargs):
            alive_at_construction.append(retired() is not None)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(rz.llm, "Engine", Watched)
    gc.disable()
    try:
        llm.generate(["a b", "c d"], max_tokens=2, temperature=0.0)
    finally:
        gc.enable()
    assert llm._current.n_slots == 2
    assert alive_at_construction == [False]


def test_a_prompt_admitted_chunk_by_chunk_between_decode_steps_gets_what_it_gets_alone(llm):
    """The server runs decode steps for the sequences in slots between the chunks of a long
    prompt (a Scheduler with a prefill budget): neither the prompt's continuation nor the running
    sequence's may change."""
    from rz.buckets import Buckets
    from rz.engine import Engine
    from rz.generation import GenerationRequest
    from rz.scheduler import Scheduler

    engine = Engine(llm.model, llm.tokenizer, N_CTX, 2, buckets=Buckets.for_context(N_CTX, largest=32))
    greedy = SamplingParams(temperature=0.0)
    running = GenerationRequest(prompt_ids=tuple(llm.tokenize("Hello, my name is")), options=RequestOptions(16, greedy, ignore_eos=True))
    # cache_prompt=False: run alone first, the long prompt would otherwise be reused whole, in one chunk.
    long = GenerationRequest(
        prompt_ids=tuple(llm.tokenize("The history of the printing press " * 14)),
        options=RequestOptions(6, greedy, ignore_eos=True, cache_prompt=False),
    )

    def record(tokens: dict, events) -> None:
        for event in events:
            tokens.setdefault(event.sequence.request, []).append(event.token_id)

    alone = {}
    one_at_a_time = Scheduler(engine)
    for request in (running, long):
        one_at_a_time.add(request)
        record(alone, one_at_a_time.drain())

    # A budget of 0: one prompt chunk per step, a decode step between every two.
    together = {}
    scheduler = Scheduler(engine, prefill_budget_s=0.0)
    scheduler.add(running)
    record(together, scheduler.step())  # its first token
    scheduler.add(long)
    record(together, scheduler.step() + scheduler.step())  # a decode step, then the long prompt's first chunk
    admission = scheduler._admission
    assert len(admission.chunks) >= 3
    record(together, scheduler.drain())
    assert together[running] == alone[running] and together[long] == alone[long]


def test_cache_types_default_to_f16_and_a_bad_name_lists_the_valid_ones(llm):
    llm.generate("a b", max_tokens=2, temperature=0.0)
    layer = llm._current.cache.layer(0)
    assert layer.keys.dtype == layer.values.dtype == np.float16
    with pytest.raises(RequestError, match="cache_type_v 'q4_0'.*f32, f16, bf16, q8_0"):
        rz.LLM(smollm2_135m_path(), cache_type_v="q4_0")


def test_keys_and_values_are_stored_as_asked():
    """q8_0 keys and bf16 values: the engine's cache holds them so, and generation runs greedy to
    the same first tokens as the f32 cache on this short prompt."""
    from rz_kernels.attention_kv import Q8_0Rows

    mixed = rz.LLM(smollm2_135m_path(), n_ctx=64, max_batch=1, cache_type_k="q8_0", cache_type_v="bf16")
    out = mixed.generate("The capital of France is", max_tokens=4, temperature=0.0, ignore_eos=True)
    layer = mixed._current.cache.layer(0)
    assert isinstance(layer.keys, Q8_0Rows) and layer.values.dtype == jnp.bfloat16
    exact = rz.LLM(smollm2_135m_path(), n_ctx=64, max_batch=1, cache_type_k="f32", cache_type_v="f32")
    assert out.token_ids == exact.generate("The capital of France is", max_tokens=4, temperature=0.0, ignore_eos=True).token_ids


# ----- logit_bias, against llama.cpp's logits processor and rz's own unbiased logits -----


@pytest.fixture(scope="module")
def llama_cpp_smollm2():
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama_cpp.Llama(model_path=str(smollm2_135m_path()), n_ctx=N_CTX, verbose=False)
    yield model
    model.close()


def llama_cpp_greedy(model, prompt: list[int], n_tokens: int, logit_bias: dict[int, float]) -> list[int]:
    """llama.cpp's greedy tokens with the biases added by a logits processor, as llama-cpp-python's
    own logit_bias does."""

    def add_bias(_, scores):
        for token, bias in logit_bias.items():
            scores[token] += bias
        return scores

    tokens = []
    for token in model.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True, logits_processor=[add_bias]):
        tokens.append(token)
        if len(tokens) == n_tokens:
            break
    return tokens


BIAS_PROMPT = "The capital of France is"


def test_a_minus_100_bias_or_a_ban_on_the_greedy_token_gives_the_runner_up_as_in_llama_cpp(llm, llama_cpp_smollm2):
    prompt = llm.tokenize(BIAS_PROMPT)
    logits = llm.score(prompt)[-1]
    first, second, third = np.argsort(-logits)[:3].tolist()
    assert logits[second] - logits[third] > NEAR_TIE  # else the engines' rounding could pick either
    theirs = llama_cpp_greedy(llama_cpp_smollm2, prompt, 1, {first: -100.0})
    for ban in (-100, False, -math.inf):
        ours = llm.generate(prompt, max_tokens=1, temperature=0.0, logit_bias={str(first): ban})
        assert ours.token_ids == theirs == [second]


def test_a_plus_100_bias_makes_its_token_win_every_step_as_in_llama_cpp(llm, llama_cpp_smollm2):
    prompt = llm.tokenize(BIAS_PROMPT)
    favoured = int(np.argsort(-llm.score(prompt)[-1])[50])  # a token greedy decoding would not choose
    theirs = llama_cpp_greedy(llama_cpp_smollm2, prompt, 4, {favoured: 100.0})
    ours = llm.generate(prompt, max_tokens=4, temperature=0.0, ignore_eos=True, logit_bias={favoured: 100})
    assert ours.token_ids == theirs == [favoured] * 4


def test_a_biased_row_and_an_unbiased_one_in_one_batch_each_get_what_they_get_alone(llm):
    prompts = [BIAS_PROMPT, "Once upon a time"]
    plain = RequestOptions.from_flat(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = llm.generate(prompts[1], max_tokens=8, temperature=0.0, ignore_eos=True)
    banned = alone.token_ids[:3]
    biased = RequestOptions.from_flat(max_tokens=8, temperature=0.0, ignore_eos=True, logit_bias={t: False for t in banned})
    biased_alone = llm._run([llm._request(prompts[1], biased)])[0]
    together = llm._run([llm._request(prompts[0], plain), llm._request(prompts[1], biased), llm._request(prompts[1], plain)])
    assert together[0].token_ids == llm.generate(prompts[0], max_tokens=8, temperature=0.0, ignore_eos=True).token_ids
    assert together[1].token_ids == biased_alone.token_ids and not set(banned) & set(biased_alone.token_ids)
    assert together[2].token_ids == alone.token_ids


def test_logit_bias_needs_no_new_compilation(llm):
    llm.generate(["a b c", "d e f g h"], max_tokens=4, temperature=0.0)
    seen = llm.compiled_variants()
    llm.generate(["x y", "the quick brown fox"], max_tokens=4, temperature=0.0, logit_bias={"5": -100, "17": 3.5})
    assert llm.compiled_variants() == seen


def test_logit_bias_token_ids_outside_the_vocabulary_are_rejected(llm):
    with pytest.raises(RequestError, match=f"logit_bias token ids \\[{llm.config.n_vocab}\\] are outside the vocabulary"):
        llm.generate("Hello", max_tokens=2, logit_bias={llm.config.n_vocab: 1})
