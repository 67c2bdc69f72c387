"""rz.speculative on the host: prompt lookup's drafts, and how many drafts a stream's record says pay."""

import numpy as np
import pytest

from rz.errors import RequestError
from rz.request import RequestOptions
from rz.speculative import (
    MAX_PROBE_INTERVAL, NGRAM_SIZES, OFF, PROBE_INTERVAL, CostModel, DraftRecord, Speculation, check_draft_vocabulary, choose_self_draft_layers,
    chosen_proposer, NgramIndex, propose_ngram,
)

# Verify calls that pay at a per-draft acceptance above about a half, as on the real models.
COSTS = CostModel(decode_step={1: 1.0}, verify_call={(1, 2): 1.3, (1, 4): 1.8, (1, 8): 3.0})


def test_prompt_lookup_continues_the_latest_earlier_occurrence_of_the_longest_recurring_suffix():
    #            0  1  2  3  4  5  6  7  8  9 10 11 12
    history = [5, 1, 2, 3, 9, 9, 2, 3, 7, 8, 1, 2, 3]
    # The suffix 1 2 3 recurs at 1..3 (followed by 9 9); the shorter 2 3 recurs later, at 6..7, but
    # the longest suffix decides.
    assert propose_ngram(history, 4) == [9, 9, 2, 3]
    assert propose_ngram(history, 1) == [9]


def test_prompt_lookup_takes_the_latest_occurrence_among_equally_long_ones():
    history = [1, 2, 7, 1, 2, 8, 1, 2]
    assert propose_ngram(history, 3) == [8, 1, 2]


def test_prompt_lookup_drafts_only_the_tokens_there_are():
    assert propose_ngram([4, 6, 4, 6], 8) == [4, 6]


def test_prompt_lookup_in_a_loop_drafts_from_the_occurrence_that_leaves_enough_tokens():
    loop = [5] + [9] * 9
    assert propose_ngram(loop, 3) == [9, 9, 9]
    assert propose_ngram(loop, 8) == [9] * 4  # the earliest 5-gram, followed by the most (the latest: by one)


def test_prompt_lookup_drafts_nothing_when_no_suffix_recurs_or_none_is_asked_for():
    assert propose_ngram([1, 2, 3, 4, 5], 4) == []
    assert propose_ngram([3], 4) == []
    assert propose_ngram([1, 2, 1, 2], 0) == []


def scanned_proposal(history, n_drafts, sizes=NGRAM_SIZES):
    """Prompt lookup by scanning the whole history: the reference NgramIndex must agree with."""
    for n in sizes:
        if n_drafts < 1 or len(history) <= n:
            continue
        starts = [s for s in range(len(history) - n) if history[s : s + n] == history[-n:]]
        if starts:
            full = [s for s in starts if s + n + n_drafts <= len(history)]
            follows = (full[-1] if full else starts[0]) + n
            return history[follows : follows + n_drafts]
    return []


def test_the_incremental_ngram_index_proposes_what_a_scan_of_the_whole_history_does():
    rng = np.random.default_rng(0)
    for _ in range(50):
        history = rng.integers(0, 4, int(rng.integers(1, 60))).tolist()
        index = NgramIndex()
        for length in range(1, len(history) + 1):
            index.extend(history[length - 1 : length])
            for n_drafts in (0, 1, 3, 7):
                assert index.propose(n_drafts) == scanned_proposal(history[:length], n_drafts)


def test_a_stream_whose_drafts_are_kept_drafts_the_most_that_pays():
    speculation = Speculation("ngram")
    speculation.record(n_drafted=40, n_kept=39)
    cheap = CostModel(decode_step={1: 1.0}, verify_call={(1, 2): 1.1, (1, 4): 1.2, (1, 8): 1.5})
    assert speculation.n_drafts(cheap, rows=1, limit=7) == 7
    assert speculation.n_drafts(cheap, rows=1, limit=2) == 2


def test_acceptance_counts_the_drafts_tried_up_to_the_first_rejection():
    """Drafts after a rejected one were never tried: 3 kept of 7 is 3 kept of 4 tried."""
    speculation = Speculation("ngram", drafts=DraftRecord(1e-9, 0.0))
    speculation.record(n_drafted=7, n_kept=3)
    assert speculation.acceptance == pytest.approx(0.75)
    speculation = Speculation("ngram", drafts=DraftRecord(1e-9, 0.0))
    speculation.record(n_drafted=7, n_kept=7)
    assert speculation.acceptance == pytest.approx(1.0)


def test_the_index_says_how_long_the_recurring_suffix_its_drafts_are_found_by_is():
    assert NgramIndex().extend([1, 2, 3, 4, 5, 6, 1, 2, 3, 4, 5]).found_by() == 5
    assert NgramIndex().extend([1, 2, 3, 4, 5, 6, 9, 3, 4, 5]).found_by() == 3
    assert NgramIndex().extend([1, 2, 3, 4, 5]).found_by() == 0


def test_prompt_lookup_drafts_a_copy_by_its_own_record_not_by_that_of_chance_ngrams():
    """A model that rewrites its input keeps few drafts found by a 2-gram, yet keeps copies found
    by the last 5 tokens: a record of the former must not hold back the latter."""
    speculation = Speculation("ngram", drafts=DraftRecord(20.0, 1.0))
    speculation.lookup.extend([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 4, 5])  # a 2-gram recurs
    assert speculation.n_drafts(COSTS, rows=1, limit=7) == 0
    speculation.lookup.extend([6, 7, 8])  # the last 5 tokens recur: a copy
    assert speculation.n_drafts(COSTS, rows=1, limit=7) > 0
    speculation.record(n_drafted=7, n_kept=1)  # counted against copies, as the lookup still stands where it drafted
    assert speculation.drafts == DraftRecord(20.0, 1.0)
    assert speculation.copies.acceptance < 0.9


def test_hindsight_judges_copies_and_chance_ngrams_apart():
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    speculation = Speculation("ngram", judged_from=len(prompt), drafts=DraftRecord(1.0, 0.0), copies=DraftRecord(1.0, 0.0))
    speculation.follow(prompt + [30, 31, 3, 4, 50, 51, 52], 3)  # a 2-gram of the prompt, not followed as there
    assert speculation.copies == DraftRecord(1.0, 0.0)
    assert speculation.drafts.acceptance < 0.1
    speculation.follow(prompt + [30, 31, 3, 4, 50, 51, 52, 5, 6, 7, 8, 9, 10, 11, 12], 3)  # a copy of the prompt
    assert speculation.copies.acceptance > 0.5


def test_a_model_proposers_stream_that_falls_back_probes_ever_less_often():
    speculation = Speculation("self", drafts=DraftRecord(20.0, 1.0))  # a record of drafts seldom kept
    costs = CostModel(decode_step={1: 1.0}, drafted_call={("self", 1, 2): 1.6, ("self", 1, 4): 2.8, ("self", 1, 8): 5.0})
    assert speculation.n_drafts(costs, rows=1, limit=7) == 0
    speculation.record_plain(PROBE_INTERVAL)
    assert speculation.n_drafts(costs, rows=1, limit=7) == 1
    speculation.record(n_drafted=1, n_kept=0)
    assert speculation.n_drafts(costs, rows=1, limit=7) == 0
    # A probe that kept nothing doubles the wait for the next one.
    speculation.record_plain(PROBE_INTERVAL)
    assert speculation.n_drafts(costs, rows=1, limit=7) == 0
    speculation.record_plain(PROBE_INTERVAL)
    assert speculation.n_drafts(costs, rows=1, limit=7) == 1
    for _ in range(10):
        speculation.record(n_drafted=1, n_kept=0)
    speculation.record_plain(MAX_PROBE_INTERVAL)
    assert speculation.n_drafts(costs, rows=1, limit=7) == 1
    # A probe that kept a draft brings the first wait back.
    speculation.record(n_drafted=1, n_kept=1)
    speculation.drafts = DraftRecord(20.0, 1.0)
    assert speculation.n_drafts(costs, rows=1, limit=7) == 0
    speculation.record_plain(PROBE_INTERVAL)
    assert speculation.n_drafts(costs, rows=1, limit=7) == 1


def test_prompt_lookup_that_falls_back_never_probes_but_drafts_again_once_hindsight_says_it_would_be_kept():
    """While it decodes plainly, the stream judges the proposal it would have made at each step
    against the tokens the model produced: free text (no proposal matches) keeps it plain, for no
    verify call however long; once the model copies its prompt, it drafts again."""
    prompt = list(range(100, 140))
    speculation = Speculation("ngram", judged_from=len(prompt), drafts=DraftRecord(20.0, 1.0),
                              copies=DraftRecord(20.0, 1.0))
    history = list(prompt)
    rng = np.random.default_rng(1)
    for token in rng.integers(0, 100, 200).tolist():  # free text: it never repeats a 2-gram of the prompt
        history.append(token)
        speculation.follow(history, 7)
        speculation.record_plain(1)
        assert speculation.n_drafts(COSTS, rows=1, limit=7) == 0
    for token in prompt[:12]:  # the model starts copying its prompt
        history.append(token)
        speculation.follow(history, 7)
    assert speculation.n_drafts(COSTS, rows=1, limit=7) > 0


def test_hindsight_does_not_judge_the_prompts_own_repeats():
    prompt = [5, 6, 7, 8] * 10
    speculation = Speculation("ngram", judged_from=len(prompt), drafts=DraftRecord(1.0, 0.0),
                              copies=DraftRecord(1.0, 0.0))
    speculation.follow(prompt, 7)
    assert speculation.acceptance == 0.0


def test_the_cost_model_uses_measured_costs_once_both_calls_are_timed():
    costs = CostModel()
    assert not costs.knows(1)
    costs.record_decode(1, 0.010)
    costs.record_verify(1, 4, 0.015)
    assert costs.knows(1) and costs.relative_verify_cost(1, 4) == pytest.approx(1.5)


def test_an_unknown_proposer_is_a_request_error_naming_the_choices():
    with pytest.raises(RequestError, match="speculative must be one of ngram"):
        RequestOptions.from_flat(speculative="medusa").validate()


def test_a_request_that_names_no_proposer_takes_the_engines_default_and_off_turns_it_off():
    assert chosen_proposer(None, "ngram") == "ngram"
    assert chosen_proposer(OFF, "ngram") is None
    assert chosen_proposer("ngram", None) == "ngram"
    assert chosen_proposer(None, None) is None
    RequestOptions.from_flat(speculative=OFF).validate()


def test_a_model_proposer_pays_for_its_draft_calls_as_well_as_the_verify_call():
    """Drafts kept 3 times in 4: worth verifying when they come free (prompt lookup), not when each
    costs 0.9 of a decode step (a self draft of most of the layers, before its calls are timed)."""
    costs = CostModel(decode_step={1: 1.0}, verify_call={(1, 2): 1.1, (1, 4): 1.2, (1, 8): 1.5}, assumed_draft_token={"self": 0.9})
    for proposer, pays in (("ngram", True), ("self", False)):
        speculation = Speculation(proposer)
        speculation.record(n_drafted=40, n_kept=30)
        assert (speculation.n_drafts(costs, rows=1, limit=7) > 0) == pays


def test_a_self_draft_runs_half_the_layers_unless_told_and_always_fewer_than_all():
    assert choose_self_draft_layers(30, None) == 15
    assert choose_self_draft_layers(30, 28) == 28
    assert choose_self_draft_layers(2, None) == 1
    for bad in (0, 30, 2.5, True):
        with pytest.raises(ValueError, match="from 1 to 29"):
            choose_self_draft_layers(30, bad)


def test_a_draft_vocabulary_unlike_the_models_is_refused_naming_the_sizes_or_the_first_differing_token():
    check_draft_vocabulary(["<s>", "a", "b"], ["<s>", "a", "b"])
    with pytest.raises(ValueError, match="vocabulary has 2 tokens, the model's 3"):
        check_draft_vocabulary(["<s>", "a", "b"], ["<s>", "a"])
    with pytest.raises(ValueError, match="token 1 is 'x', the model's 'a'"):
        check_draft_vocabulary(["<s>", "a", "b"], ["<s>", "x", "y"])
