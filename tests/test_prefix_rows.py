"""rz.prefix_rows on its own: which row a prompt takes, which row its prefix is copied from, and
when a ring of blocks still holds what a reused prefix needs."""

from rz.prefix_rows import Placement, PrefixRows


def placed(rows: PrefixRows, prompt: list[int], free: list[int], held: list[tuple], reuse: bool = True) -> Placement:
    placement = rows.place(prompt, reuse, free, held)
    rows.filled(placement, len(prompt))
    return placement


def test_a_prompt_copies_the_longest_prefix_from_any_row_into_an_empty_one():
    rows = PrefixRows(3)
    held = [(1, 2, 3, 9), (1, 2, 7), ()]
    # Row 1 runs (not free), yet serves its prefix; row 0 keeps its own tokens, so the empty row 2 is taken.
    assert placed(rows, [1, 2, 3, 4], free=[0, 2], held=held) == Placement(row=2, source=0, n_cached=3)


def test_the_last_prompt_token_is_always_computed_again():
    rows = PrefixRows(2)
    assert placed(rows, [1, 2, 3], free=[1], held=[(1, 2, 3), ()]) == Placement(row=1, source=0, n_cached=2)


def test_a_row_the_prompt_extends_is_taken_in_place():
    rows = PrefixRows(2)
    assert placed(rows, [1, 2, 3, 4], free=[0, 1], held=[(1, 2, 3), ()]) == Placement(row=0, source=0, n_cached=3)


def test_without_an_empty_row_the_least_recently_used_free_row_is_evicted():
    rows = PrefixRows(3)
    rows.released(1, (5, 6))
    rows.released(0, (7, 8))
    rows.released(2, (4, 4))
    held = [(7, 8), (5, 6), (4, 4)]
    assert placed(rows, [7, 3], free=[0, 1, 2], held=held) == Placement(row=1, source=0, n_cached=1)
    # Serving a prefix counts as a use: row 2 is now the idlest.
    assert placed(rows, [9, 9], free=[0, 1, 2], held=[(7, 8), (7, 3), (4, 4)]).row == 2


def test_cache_prompt_false_copies_nothing():
    rows = PrefixRows(2)
    assert placed(rows, [1, 2, 3], free=[1], held=[(1, 2, 3), ()], reuse=False) == Placement(row=1)


def test_a_ring_that_wrapped_serves_only_a_prefix_it_was_not_written_past():
    # A ring of 32 slots (two blocks of 16, window 8): it keeps a tail's window while the row's
    # writes stay within 32 - 16 - 8 = 8 positions past the tail's start.
    rows = PrefixRows(1, ring=(32, 8))
    held = tuple(range(40))
    rows.written[0] = 40
    assert rows.reusable(0, held, [*held, 99]) == 40  # the window before 40 is there
    assert rows.reusable(0, held, [*held[:32], 99]) == 32  # written 8 past 32: positions 24..31 are there
    assert rows.reusable(0, held, [*held[:31], 99]) == 0  # 9 past: beyond what the ring is sure to keep
    rows.written[0] = 42  # decode calls launched ahead wrote past the tokens
    assert rows.reusable(0, held, [*held, 99]) == 40
    assert rows.reusable(0, held, [*held[:33], 99]) == 0
    rows.written[0] = 32  # never wrapped: every prefix is there
    assert rows.reusable(0, held[:32], [*held[:3], 99]) == 3


def test_a_copied_row_inherits_its_sources_written_positions():
    rows = PrefixRows(2, ring=(32, 8))
    rows.wrote(0, 7)
    rows.filled(Placement(row=1, source=0, n_cached=3), n_positions=5)
    assert rows.written[1] == 7
