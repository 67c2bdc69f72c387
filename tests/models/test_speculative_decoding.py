"""Speculative decoding end to end (rz.steps.verify driven by rz.engine) on tiny models: the tokens of
plain decoding, greedy or seeded; the same output distribution; stop conditions where they
were; and a cache that holds only the kept tokens."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rz
from rz import kv_cache, steps
from rz.engine import Engine
from rz.request import RequestOptions, SamplingParams
from rz.sampling import SamplerState, SamplingTensors
from rz import engine as engine_module
from rz.speculative import propose_ngram
from rz.warm_up import warm_up
from rz_kernels import attention_kv
from support.speculation import (
    DraftingAlwaysPays, assert_same_distribution, assert_same_up_to_near_ties, assert_stops_land_where_they_do_without_speculation,
    DISTRIBUTION_SLOTS, drafting_engine, first_five_tokens, plain_engine, release_executables, repetitive_prompts, run, small_blocks_and_chunks,
)
from test_kv_cache import QUANTIZED_NMSE
from tiny_models import N_VOCAB, write_tiny_model

N_CTX = 256
SAMPLED = dict(
    temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repeat_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1,
)


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    """A tiny model of one (architecture, weight type), parametrized per test (ON_TINY, ON_TINY_F32):
    pytest groups the module's tests by model, so a model both lists name (Gemma 3 F32) loads and
    compiles once. Its executables are released when its tests end."""
    arch, weight_type = request.param
    yield rz.LLM(write_tiny_model(tmp_path_factory.mktemp(arch) / "model.gguf", arch, weight_type), n_ctx=N_CTX)
    release_executables()


# Gemma 3 with a window of 8 (ring buffers that verify calls overwrite), and a quantized llama.
ON_TINY = pytest.mark.parametrize("tiny", [("gemma3", "F32"), ("llama", "Q8_0")], ids="-".join, indirect=True)
# Models whose verify and decode logits agree to the bit (f32 matmuls), for sampling's exactness.
ON_TINY_F32 = pytest.mark.parametrize("tiny", [("gemma3", "F32"), ("llama", "F32")], ids="-".join, indirect=True)


@pytest.fixture
def spoiled_drafts(monkeypatch):
    """Prompt lookup, or the last tokens when no suffix recurs (a sampled tiny model's text seldom
    repeats), with the third draft changed (a tiny model's greedy loops would keep every draft)."""

    def draft(speculation, history, n_drafts):
        drafts = propose_ngram(history, n_drafts) or list(history[-n_drafts:])
        return [(t + 1) % N_VOCAB if i == 2 else t for i, t in enumerate(drafts)]

    monkeypatch.setattr(engine_module, "draft", draft)


@ON_TINY
def test_greedy_speculative_decoding_gives_the_tokens_of_plain_decoding(tiny, spoiled_drafts):
    prompts = repetitive_prompts(8, N_VOCAB)
    options = RequestOptions(max_tokens=40, sampling=SamplingParams(temperature=0))
    plain = run(plain_engine(tiny, 4), prompts, options)
    engine = drafting_engine(tiny, 4)
    speculative = run(engine, prompts, RequestOptions(max_tokens=40, sampling=SamplingParams(temperature=0), speculative="ngram"))
    assert_same_up_to_near_ties(tiny, prompts, speculative, plain)
    assert 0 < engine.n_accepted < engine.n_drafted  # drafts were both kept and rejected


@ON_TINY
def test_greedy_self_speculation_gives_the_tokens_of_plain_decoding(tiny):
    """The target's first layer drafts (on tiny Gemma 3 it agrees with the whole model's greedy loops;
    on tiny llama both kept and rejected drafts occur)."""
    prompts = repetitive_prompts(8, N_VOCAB)
    options = RequestOptions(max_tokens=40, sampling=SamplingParams(temperature=0))
    plain = run(plain_engine(tiny, 4), prompts, options)
    engine = drafting_engine(tiny, 4, self_draft_layers=1)
    speculative = run(engine, prompts, RequestOptions(max_tokens=40, sampling=SamplingParams(temperature=0), speculative="self"))
    assert_same_up_to_near_ties(tiny, prompts, speculative, plain)
    assert 0 < engine.n_accepted <= engine.n_drafted


@ON_TINY
def test_after_the_warm_up_a_speculating_request_compiles_nothing(tiny):
    """With speculative='self' the default: the draft calls and the verify calls that weigh its drafts."""
    engine = Engine(
        tiny.model, tiny.tokenizer, N_CTX, 1, speculative="self", self_draft_layers=1, **small_blocks_and_chunks(N_CTX)
    )
    engine.costs = DraftingAlwaysPays()
    warm_up(engine)
    compiled = set(engine.compilations)
    run(engine, repetitive_prompts(1, N_VOCAB), RequestOptions(max_tokens=24, sampling=SamplingParams(temperature=0)))
    assert engine.n_drafted > 0
    assert set(engine.compilations) == compiled


@ON_TINY_F32
@pytest.mark.parametrize("seed", [3, 11])
def test_a_seeded_speculative_run_gives_the_tokens_and_logprobs_of_the_same_seeded_plain_run(tiny, seed, spoiled_drafts):
    prompts = repetitive_prompts(4, N_VOCAB)
    plain_options = RequestOptions(max_tokens=32, sampling=SamplingParams(**SAMPLED, seed=seed, n_logprobs=3))
    plain = run(plain_engine(tiny, 4), prompts, plain_options)
    engine = drafting_engine(tiny, 4)
    speculative = run(engine, prompts, RequestOptions(**{**plain_options.__dict__, "speculative": "ngram"}))
    assert engine.n_drafted > 0
    assert [s.output_ids for s in speculative] == [s.output_ids for s in plain]
    for spec, ref in zip(speculative, plain):
        assert [entry["token"] for entry in spec.logprobs] == spec.output_ids
        np.testing.assert_allclose(
            [entry["logprob"] for entry in spec.logprobs], [entry["logprob"] for entry in ref.logprobs], atol=1e-4
        )


@ON_TINY_F32
def test_verify_calls_apply_logit_bias_as_plain_decoding_does(tiny, spoiled_drafts):
    """A seeded, biased speculative run gives the biased plain run's tokens; the banned tokens never come."""
    prompts = repetitive_prompts(4, N_VOCAB)
    unbiased = run(plain_engine(tiny, 4), prompts,
                   RequestOptions(max_tokens=24, sampling=SamplingParams(**SAMPLED, seed=5)))
    # Ban the two tokens the unbiased streams sampled most, and favour the third a little.
    frequent = np.bincount(np.concatenate([s.output_ids for s in unbiased]), minlength=N_VOCAB).argsort()[::-1][:3].tolist()
    biased = SamplingParams(**SAMPLED, seed=5, logit_bias=((frequent[0], -math.inf), (frequent[1], -100.0), (frequent[2], 2.0)))
    plain = run(plain_engine(tiny, 4), prompts, RequestOptions(max_tokens=24, sampling=biased))
    engine = drafting_engine(tiny, 4)
    speculative = run(engine, prompts, RequestOptions(max_tokens=24, sampling=biased, speculative="ngram"))
    assert engine.n_drafted > 0
    assert [s.output_ids for s in speculative] == [s.output_ids for s in plain]
    assert not {frequent[0], frequent[1]} & set(np.concatenate([s.output_ids for s in speculative]).tolist())


@ON_TINY
@pytest.mark.parametrize("proposers", [("ngram", "ngram"), ("self", "ngram")], ids="+".join)
def test_a_speculating_stream_and_plain_ones_batch_together(tiny, spoiled_drafts, proposers):
    """Two of each, the last two ending first: verify calls then run on the first rows of the cache;
    the speculating ones may draft with different proposers in one verify call."""
    prompts = repetitive_prompts(4, N_VOCAB)
    greedy = SamplingParams(temperature=0)
    lengths = (24, 24, 6, 6)
    alone = [
        run(plain_engine(tiny, 1), [p], RequestOptions(max_tokens=n, sampling=greedy))[0]
        for p, n in zip(prompts, lengths)
    ]
    mixed = [RequestOptions(max_tokens=n, sampling=greedy, speculative=proposers[i // 2] if i % 2 else None) for i, n in enumerate(lengths)]
    engine = drafting_engine(tiny, 4, self_draft_layers=1)
    together = run(engine, prompts, mixed)
    assert engine.n_drafted > 0
    assert_same_up_to_near_ties(tiny, prompts, together, alone)


@ON_TINY_F32
@pytest.mark.parametrize("proposer", ["ngram", "self"])
def test_stop_strings_stop_tokens_and_max_tokens_land_where_they_do_without_speculation(tiny, spoiled_drafts, proposer):
    prompt = repetitive_prompts(1, N_VOCAB)[0]
    assert_stops_land_where_they_do_without_speculation(
        tiny, prompt, lambda: drafting_engine(tiny, 1, self_draft_layers=1), proposer
    )


# Blocks of 4 slots and chunks of at most 8 tokens: Gemma 3's rings (window 8) hold 20 slots, which
# a 20-token prompt and its drafts wrap.
BLOCK_SIZE = 4
MAX_WRITE = 8


def filled(model, ids, types: kv_cache.CacheTypes = kv_cache.CacheTypes()) -> kv_cache.KVCache:
    """A one-row cache of small blocks filled with ids, in chunks of MAX_WRITE."""
    weights, static = model.weights, {"family": model.family, "cfg": model.cfg}
    cache = kv_cache.init_cache(model.cfg, 1, 64, types, block_size=BLOCK_SIZE, max_write=MAX_WRITE)
    for start in range(0, len(ids), MAX_WRITE):
        positions = jnp.arange(start, min(start + MAX_WRITE, len(ids)), dtype=jnp.int32)[None]
        tables = steps.chunk_rope_tables(model.family.rope_freq_factors(weights), positions, cfg=model.cfg)
        cache = steps.score(weights, cache, jnp.asarray([ids[start : start + MAX_WRITE]], jnp.int32), positions, tables, **static)[1]
    return cache


def assert_holds_what_the_next_query_sees(cache: kv_cache.KVCache, expected: kv_cache.KVCache, cfg, next_position: int):
    """cache holds expected's keys, values and positions wherever expected holds a position that a
    query at next_position may see (below it; a sliding layer: within its window), read through the
    tables. The rest (stale later positions, a ring's older laps) attention never sees."""
    for index, sliding in enumerate(cfg.sliding_layers):
        got_keys, got_values, got_positions = kv_cache.through_table(cache.view(index, 1))
        want_keys, want_values, want_positions = kv_cache.through_table(expected.view(index, 1))
        want_positions = np.asarray(want_positions)
        lowest = next_position - cfg.sliding_window if sliding else 0
        seen = (want_positions >= lowest) & (want_positions < next_position)
        np.testing.assert_array_equal(np.asarray(got_positions)[seen], want_positions[seen])
        held = seen[:, None, :, None]
        for got, ref in ((got_keys, want_keys), (got_values, want_values)):
            got, ref = np.asarray(attention_kv.to_f32(got)) * held, np.asarray(attention_kv.to_f32(ref)) * held
            assert np.sum((got - ref) ** 2) <= QUANTIZED_NMSE * np.sum(ref**2)


@ON_TINY
@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_rejected_drafts_leave_the_cache_as_a_prefill_of_the_kept_tokens(tiny, cache_type):
    """A verify call whose third draft is wrong: the cache afterwards holds, wherever the next query
    looks, what one filled with the prompt and the kept tokens holds, in the default cache type and
    in q8_0. Rejected drafts stay as stale later positions, which attention never sees (see
    rz.steps.verify), and what they overwrote in a ring (its blocks wrap here) is outside the window."""
    model, weights, static = tiny.model, tiny.model.weights, {"family": tiny.model.family, "cfg": tiny.model.cfg}
    if cache_type == "q8_0" and model.cfg.head_dim % attention_kv.Q8_0_BLOCK:
        pytest.skip("q8_0 holds heads of whole 32-value blocks only, as llama.cpp's")
    prompt = repetitive_prompts(3, N_VOCAB)[2][:20]
    greedy = tiny.generate(prompt, max_tokens=4, temperature=0).token_ids  # t0, then what greedy decoding follows it with
    wrong = (greedy[3] + 1) % N_VOCAB
    fed = [greedy[0], greedy[1], greedy[2], wrong, greedy[1], greedy[2], wrong, greedy[1]]
    types = kv_cache.CacheTypes(cache_type, cache_type)

    positions = jnp.arange(len(prompt), len(prompt) + len(fed), dtype=jnp.int32)[None]
    params = SamplingParams(temperature=0)
    sampled, n_emitted, cache, _ = steps.verify(
        weights, filled(model, prompt, types), jnp.asarray([fed], jnp.int32), positions,
        steps.chunk_rope_tables(model.family.rope_freq_factors(weights), positions, cfg=model.cfg),
        SamplingTensors.from_params([params]), SamplerState.create([params], [prompt]), **static, n_top=0,
    )
    assert int(n_emitted[0]) == 3
    assert np.asarray(sampled.tokens[:3, 0]).tolist() == greedy[1:4]
    kept = prompt + greedy[:3]
    assert_holds_what_the_next_query_sees(cache, filled(model, kept, types), model.cfg, len(kept))


@ON_TINY
def test_a_self_draft_leaves_the_cache_as_it_found_it_where_the_next_query_looks(tiny):
    """The draft writes the last token and its drafts into the first layers, at positions from the
    last token's on, which the verify call overwrites; every key the last token's query may see stays
    (a ring's blocks wrap here: it holds the window and a whole chunk)."""
    model = tiny.model
    prompt = repetitive_prompts(3, N_VOCAB)[2][:20]
    cache = filled(model, prompt)
    before = jax.tree.map(np.array, cache)  # a copy: the draft updates the cache in place
    engine = Engine(model, tiny.tokenizer, N_CTX, 1, self_draft_layers=model.cfg.n_layer - 1, **small_blocks_and_chunks(N_CTX))
    draft_model = engine.self_draft
    params = SamplingParams(temperature=0)
    drafts, probabilities, cache = steps.draft(
        draft_model.weights, cache.first_layers(draft_model.cfg.n_layer), jnp.asarray([prompt[-1]], jnp.int32),
        jnp.asarray([len(prompt) - 1], jnp.int32), SamplingTensors.from_params([params]), SamplerState.create([params], [prompt]),
        family=draft_model.family, cfg=draft_model.cfg, n_ctx=64, n_drafts=7,
    )
    assert drafts.shape == (1, 7) and np.asarray(probabilities).sum(axis=-1) == pytest.approx(1.0)
    before = before.first_layers(draft_model.cfg.n_layer)
    assert_holds_what_the_next_query_sees(cache, before, draft_model.cfg, len(prompt) - 1)


@pytest.fixture(scope="module")
def sampled_model(tmp_path_factory):
    """A tiny llama (n_ctx 64) and N_SAMPLES plain samples of it, which both proposers' runs are compared with."""
    llm = rz.LLM(write_tiny_model(tmp_path_factory.mktemp("sampled") / "model.gguf", "llama", "F32", seed=5), n_ctx=64)
    return llm, first_five_tokens(Engine(llm.model, llm.tokenizer, 64, 16), None, 0)


@pytest.mark.parametrize("proposer", ["ngram", "self"])
def test_speculative_sampling_preserves_the_distribution_of_the_first_and_fifth_tokens(sampled_model, spoiled_drafts, proposer):
    """2,000 samples with speculation and 2,000 without (other seeds), compared by a chi-square test
    of homogeneity (p > 0.01) on the tokens seen at least 5 times in all; the drafts are mostly unlike
    what the model samples: spoiled prompt lookup, a point mass, or the first of the model's three
    layers, a distribution q weighed against the model's p."""
    llm, plain = sampled_model
    engine = drafting_engine(llm, DISTRIBUTION_SLOTS, self_draft_layers=1)
    speculative = first_five_tokens(engine, proposer, 100_000)
    assert 0 < engine.n_accepted < engine.n_drafted
    assert_same_distribution(plain, speculative)
