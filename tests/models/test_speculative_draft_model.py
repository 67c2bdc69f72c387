"""The `draft` proposer (a second GGUF of the target's vocabulary, rz.engine) on tiny models: plain
decoding's tokens, its distribution with a draft unlike the target, stop conditions where they were,
a draft cache that holds the kept text after rejections, and the errors of a draft that cannot be
one. A module of its own: it compiles a second model's steps (see tests/conftest.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

import rz
from rz import kv_cache, steps
from rz.engine import Engine
from rz.errors import RequestError
from rz.model_files import smollm2_135m_path
from rz.request import RequestOptions, SamplingParams
from rz.warm_up import warm_up
from support.speculation import (
    DraftingAlwaysPays, assert_same_distribution, assert_same_up_to_near_ties, assert_stops_land_where_they_do_without_speculation,
    DISTRIBUTION_SLOTS, drafting_engine, first_five_tokens, plain_engine, release_executables, repetitive_prompts, run,
)
from tiny_models import N_VOCAB, write_tiny_model

N_CTX = 128
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The target (a tiny llama), a copy of it as a draft (whose greedy drafts are kept), and a
    draft unlike it (a tiny Gemma 3 of other weights, with ring-buffer layers): their paths."""
    folder = tmp_path_factory.mktemp("draft")
    paths = {
        "target": write_tiny_model(folder / "target.gguf", "llama", "F32", seed=5),
        "unlike": write_tiny_model(folder / "unlike.gguf", "gemma3", "F32", seed=11),
    }
    paths["copy"] = paths["target"]
    yield paths
    release_executables()


@pytest.fixture(scope="module")
def target(models):
    return rz.LLM(models["target"], n_ctx=N_CTX, draft_model=models["unlike"])


@pytest.fixture(scope="module")
def drafts(models, target):
    """Each draft's loaded model, by name."""
    return {"unlike": target.draft_model, "copy": target.model}


@pytest.mark.parametrize("draft", ["copy", "unlike"])
def test_greedy_drafting_with_a_draft_model_gives_the_tokens_of_plain_decoding(target, drafts, draft):
    """A copy of the target drafts exactly its greedy tokens: in f32 caches, since an f16 cache's
    prompt attention may multiply its values in bf16 where the target's short chunks do not
    (rz_kernels.causal_attention.takes_bf16_values), which flips near-ties."""
    prompts = repetitive_prompts(8, N_VOCAB)
    options = RequestOptions(max_tokens=32, sampling=GREEDY)
    caches = {"cache_types": kv_cache.CacheTypes("f32", "f32")} if draft == "copy" else {}
    plain = run(plain_engine(target, 4, **caches), prompts, options)
    engine = drafting_engine(target, 4, draft_model=drafts[draft], **caches)
    speculative = run(engine, prompts, RequestOptions(max_tokens=32, sampling=GREEDY, speculative="draft"))
    assert_same_up_to_near_ties(target, prompts, speculative, plain)
    if draft == "copy":
        assert engine.n_accepted == engine.n_drafted > 0  # the target's own greedy tokens
    else:
        assert 0 < engine.n_accepted < engine.n_drafted


def test_after_rejected_drafts_and_in_reused_rows_the_draft_cache_holds_what_a_prefill_of_the_kept_text_holds(target, drafts):
    """Each row's draft cache, at the positions it is said to hold, is what feeding it the stream's
    kept text from scratch gives: rejected drafts (and the tokens the draft never saw) do not stay;
    nor does a row's earlier text after the prefix that a later stream shares with it (whose later
    positions would otherwise hide the shared window from the unlike draft's ring-buffer layers)."""
    prompts = repetitive_prompts(2, N_VOCAB)
    engine = drafting_engine(target, 2, draft_model=drafts["unlike"])
    options = RequestOptions(max_tokens=30, sampling=GREEDY, speculative="draft")
    run(engine, prompts, options)
    assert engine.n_accepted < engine.n_drafted
    assert_draft_rows_hold_their_text(engine, drafts["unlike"])
    run(engine, [prompts[0][:6] + prompts[1][6:], prompts[1][:6] + prompts[0][6:]], options)
    assert_draft_rows_hold_their_text(engine, drafts["unlike"])


def assert_draft_rows_hold_their_text(engine, draft) -> None:
    """Through each row's tables, the draft cache holds what feeding the row's text from scratch
    gives, wherever the next query may look (below its position; a sliding layer: within its window)."""
    chunk = 8
    for slot, held in enumerate(engine._draft_held):
        assert len(held) > 20
        fresh = draft.init_cache(1, N_CTX, block_size=engine.block_size, max_write=engine._draft_max_write)
        for start in range(0, len(held), chunk):
            positions = jnp.arange(start, min(start + chunk, len(held)), dtype=jnp.int32)[None]
            tables = steps.chunk_rope_tables(draft.family.rope_freq_factors(draft.weights), positions, cfg=draft.cfg)
            fresh = steps.feed(draft.weights, fresh, jnp.asarray(held[start : start + chunk])[None], positions, tables,
                               family=draft.family, cfg=draft.cfg)
        row = engine.draft_cache.with_tables(tuple(table[slot : slot + 1] for table in engine.draft_cache.tables))
        for index, sliding in enumerate(draft.cfg.sliding_layers):
            got_keys, got_values, got_positions = kv_cache.through_table(row.view(index, 1))
            want_keys, want_values, want_positions = kv_cache.through_table(fresh.view(index, 1))
            want_positions = np.asarray(want_positions)
            lowest = len(held) - draft.cfg.sliding_window if sliding else 0
            # Slots at later positions (stale drafts) are hidden by causality; the rest are the prefill's.
            seen = (want_positions >= lowest) & (want_positions < len(held))
            np.testing.assert_array_equal(np.asarray(got_positions)[seen], want_positions[seen])
            for got, ref in ((got_keys, want_keys), (got_values, want_values)):
                got, ref = np.asarray(got[0], np.float32)[:, seen[0]], np.asarray(ref[0], np.float32)[:, seen[0]]
                np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("draft", ["copy", "unlike"])
def test_stop_strings_stop_tokens_and_max_tokens_land_where_they_do_without_speculation(target, drafts, draft):
    prompt = repetitive_prompts(1, N_VOCAB)[0]
    drafted = assert_stops_land_where_they_do_without_speculation(
        target, prompt, lambda: drafting_engine(target, 1, draft_model=drafts[draft]), "draft"
    )
    assert drafted > 0


def test_sampling_with_a_draft_unlike_the_target_preserves_the_distribution_of_the_first_and_fifth_tokens(target, drafts):
    """2,000 seeded samples with the unlike draft and 2,000 without (other seeds), chi-square (p > 0.01):
    its drafts are drawn from its own distribution q and weighed against the target's p."""
    plain = first_five_tokens(Engine(target.model, target.tokenizer, N_CTX, 16), None, 0)
    engine = drafting_engine(target, DISTRIBUTION_SLOTS, draft_model=drafts["unlike"])
    speculative = first_five_tokens(engine, "draft", 100_000)
    assert 0 < engine.n_accepted < engine.n_drafted
    assert_same_distribution(plain, speculative)


def test_after_the_warm_up_a_request_drafting_with_the_default_draft_model_compiles_nothing(target, drafts):
    engine = Engine(target.model, target.tokenizer, N_CTX, 1, speculative="draft", draft_model=drafts["unlike"])
    engine.costs = DraftingAlwaysPays()
    warm_up(engine)
    compiled = set(engine.compilations)
    run(engine, repetitive_prompts(1, N_VOCAB), RequestOptions(max_tokens=24, sampling=GREEDY))
    assert engine.n_drafted > 0
    assert set(engine.compilations) == compiled


def test_a_draft_model_of_another_vocabulary_is_refused_naming_both_sizes(models):
    """Refused when loaded, before its weights are read: SmolLM2's vocabulary is not the tiny model's."""
    with pytest.raises(RequestError, match=f"vocabulary has 49,152 tokens, the model's {N_VOCAB:,}"):
        rz.LLM(models["target"], n_ctx=N_CTX, draft_model=smollm2_135m_path())


def test_speculative_draft_without_a_draft_model_is_a_request_error(models):
    llm = rz.LLM(models["target"], n_ctx=N_CTX)
    with pytest.raises(RequestError, match="draft_model=PATH"):
        llm.generate([1, 2, 3], max_tokens=2, speculative="draft")
