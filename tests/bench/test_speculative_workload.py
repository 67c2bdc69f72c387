"""rz.bench.speculative's hindsight bound: the best schedule of prompt lookup's drafts on a given text."""

from rz.bench.speculative import hindsight_bound

CHEAP = {2: 1.0, 4: 1.0, 8: 1.0}  # a verify call as cheap as a decode step


def test_a_copy_of_the_prompt_is_bounded_by_its_drafts():
    prompt = [10, 11, 12, 13, 14, 15, 16, 17]
    # After the first token (prefill's) one plain step gives [10, 11], a 2-gram of the prompt; one
    # verify call then keeps the 6 tokens that follow it there: 7 tokens in 2 steps.
    assert hindsight_bound(prompt, list(prompt), CHEAP) == 7 / 2


def test_a_text_that_repeats_nothing_gains_nothing():
    assert hindsight_bound([1, 2, 3, 4], [5, 6, 7, 8, 9, 20, 21], CHEAP) == 1.0


def test_drafts_that_cost_more_than_they_keep_are_not_scheduled():
    prompt = [10, 11, 12, 13, 14, 15, 16, 17]
    assert hindsight_bound(prompt, list(prompt), {2: 10.0, 4: 10.0, 8: 10.0}) == 1.0


def test_a_wrong_draft_still_keeps_the_verify_calls_own_token():
    # The drafts after [10, 11] are [12, 13, 14]; the text goes 12, 99: one draft kept, then the
    # call's own token (99), so a 4-wide call at cost 1 gives 2 tokens.
    prompt = [10, 11, 12, 13, 14]
    assert hindsight_bound(prompt, [10, 11, 12, 99], {4: 1.0}) == 3 / 2
