"""StopStringMatcher: cut at the earliest stop, never emit any part of one, whatever the chunking."""

import random

import pytest

from rz.errors import RequestError
from rz.stopping import MAX_STOP_CHARS, MAX_STOPS, StopStringMatcher, _Automaton, validate_stops


def expected_output(text: str, stops) -> tuple[str, bool]:
    hits = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(hits)], True) if hits else (text, False)


def stream(chunks, stops) -> tuple[list[str], bool]:
    """Feed chunks; returns the emitted pieces (checking each prefix as it goes) and whether it stopped."""
    matcher = StopStringMatcher(stops)
    full_expected, _ = expected_output("".join(chunks), stops)
    emitted, stopped = [], False
    for chunk in chunks:
        piece, stopped = matcher.feed(chunk)
        emitted.append(piece)
        # At every moment, what has gone out is a prefix of the final answer: nothing of a stop
        # string that later completed was ever emitted.
        assert full_expected.startswith("".join(emitted))
        if stopped:
            break
    if not stopped:
        emitted.append(matcher.flush())
    return emitted, stopped


def random_chunks(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


STOP_SETS = [
    ["aba"],
    ["bb", "aab"],
    ["abab", "bab"],  # overlapping, one inside the other's tail
    ["a", "ab"],  # one a prefix of the other
    ["ba", "abba", "aaaa"],
    ["</s>", "\n\n"],
]


@pytest.mark.parametrize("stops", STOP_SETS, ids=lambda s: "|".join(map(repr, s)))
def test_any_chunking_gives_the_earliest_cut_and_leaks_nothing(stops):
    rng = random.Random("|".join(stops))
    alphabet = "ab" if all(set(s) <= set("ab") for s in stops) else "ab</s>\n "
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        chunks = random_chunks(rng, text) if text else [""]
        emitted, stopped = stream(chunks, stops)
        assert ("".join(emitted), stopped) == expected_output(text, stops), (text, chunks)


def test_holds_back_a_possible_stop_and_releases_it_when_it_diverges():
    matcher = StopStringMatcher(["world"])
    assert matcher.feed("Hello wor") == ("Hello ", False)
    assert matcher.feed("k") == ("work", False)
    assert matcher.feed(" wo") == (" ", False)
    assert matcher.flush() == "wo"
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins():
    matcher = StopStringMatcher(["END", "STOP"])
    assert matcher.feed("one ST") == ("one ", False)
    assert matcher.feed("OP two END") == ("", True)


def test_stop_split_across_many_tokens_and_overlapping_candidates():
    matcher = StopStringMatcher(["abcd", "bce"])
    pieces = [matcher.feed(c) for c in ["x", "a", "b", "c", "e", "z"]]
    # "abc" might still become "abcd"; "bce" completes first, starting at index 2.
    assert pieces[:5] == [("x", False), ("", False), ("", False), ("", False), ("a", True)]
    assert pieces[5] == ("", True)


def test_after_stopping_everything_is_dropped():
    matcher = StopStringMatcher("\n")
    assert matcher.feed("line\nmore") == ("line", True)
    assert matcher.feed("even more") == ("", True)
    assert matcher.flush() == ""


def test_no_stops_passes_text_straight_through():
    matcher = StopStringMatcher(None)
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_validate_stops():
    assert validate_stops(None) == ()
    assert validate_stops("x") == ("x",)
    assert validate_stops(["a", "b", "a"]) == ("a", "b")
    with pytest.raises(RequestError, match="empty"):
        validate_stops(["ok", ""])
    with pytest.raises(RequestError, match="string"):
        validate_stops(["ok", 3])
    with pytest.raises(RequestError, match="string"):
        validate_stops(42)
    with pytest.raises(RequestError, match="empty"):
        StopStringMatcher("")


def test_limits_on_the_number_and_length_of_stops():
    assert len(validate_stops([f"stop {i}" for i in range(MAX_STOPS)])) == MAX_STOPS
    with pytest.raises(RequestError, match=f"over the limit of {MAX_STOPS}"):
        validate_stops([f"stop {i}" for i in range(MAX_STOPS + 1)])
    assert validate_stops(["x" * MAX_STOP_CHARS]) == ("x" * MAX_STOP_CHARS,)
    with pytest.raises(RequestError, match=f"over the limit of {MAX_STOP_CHARS}"):
        validate_stops(["x" * (MAX_STOP_CHARS + 1)])


def test_work_per_character_does_not_grow_with_the_stops():
    """The probe's attack at the limits: every stop long, one partially matching the output."""
    steps = []

    class CountingAutomaton(_Automaton):
        def step(self, node, char):
            steps.append(char)
            return super().step(node, char)

    def transitions(stops, text):
        matcher = StopStringMatcher(stops)
        matcher._automaton = CountingAutomaton(matcher.stops)
        steps.clear()
        for char in text:
            matcher.feed(char)
        return len(steps)

    text = "the answer is " + "ab" * 500
    few = transitions(["abz"], text)
    many = transitions([f"{i:03d}" + "ab" * (MAX_STOP_CHARS // 2 - 2) for i in range(MAX_STOPS - 1)] + ["ab" * 100 + "z"], text)
    assert few == many == len(text)


def reference_feed(state: dict, text: str, stops) -> tuple[str, bool]:
    """The plain search the automaton replaces: every stop looked for in the pending text, the
    earliest completed one cutting, the longest tail that begins a stop held back."""
    pending = state["held"] + text
    matches = [index for index in (pending.find(stop) for stop in stops) if index >= 0]
    if matches:
        return pending[: min(matches)], True
    held = max((n for stop in stops for n in range(1, len(stop)) if pending.endswith(stop[:n])), default=0)
    state["held"] = pending[len(pending) - held :]
    return pending[: len(pending) - held], False


def test_the_automaton_cuts_where_the_plain_search_does_on_random_stops_and_chunkings():
    rng = random.Random(7)
    for _ in range(1000):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 6))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        matcher, state = StopStringMatcher(stops), {"held": ""}
        for chunk in random_chunks(rng, text) if text else [""]:
            expected = reference_feed(state, chunk, stops)
            assert matcher.feed(chunk) == expected, (stops, text)
            if expected[1]:
                break
        else:
            assert matcher.flush() == state["held"]
