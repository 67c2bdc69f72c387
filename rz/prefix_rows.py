"""Prefix reuse over the rows of the engine's KV cache: which row a prompt takes, and which row's
keys and values its prefix is copied from.

Each batch row holds one sequence at positions 0.. . A row keeps its sequence's KV after the
sequence leaves, as a cache. A new prompt copies the longest prefix that any row holds (a free
row's, or a running sequence's: another choice of the same `n` > 1 request, or a request with
the same system prompt) and prefills only the rest. It takes a free row whose contents the new
row makes redundant (an empty row, or one whose tokens the prompt starts with), else the least
recently used free row.

This is host-side bookkeeping only, a pure function of what the engine tells it: each row owns its
blocks of the cache's pools (kv_cache.identity_tables), and a copied prefix is a copy of blocks.
"""

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Placement:
    """Where a prompt's prefill goes: into free row `row`, after the first `n_cached` tokens
    copied from row `source` (-1 and 0 when nothing is reused)."""

    row: int
    source: int = -1
    n_cached: int = 0


class PrefixRows:
    """What each row of a cache holds, how far its rings of blocks may have been written, and when it was last used.

    ring: kv_cache.ring of the cache, (slots, reach) of its sliding layers' rings ((0, 0): none). A
    ring keeps only its last `slots` positions written: to prefill a tail from position n on, the
    query at n needs the keys at n - window .. n - 1, which a row holds while its writes have not
    passed max(slots, n + reach) (positions from n on are stale, hidden from the tail, and
    overwritten by it).
    """

    def __init__(self, n_rows: int, ring: tuple[int, int] = (0, 0)):
        self.ring_slots, self.ring_reach = ring
        # Per free row, the tokens whose KV it holds at positions 0.. (a running row's are its sequence's).
        self.kept: list[tuple[int, ...]] = [()] * n_rows
        # Per row, a bound on the positions its cache has been written at (the highest plus one),
        # whatever the tokens: decode calls launched ahead run past a sequence's end.
        self.written = [0] * n_rows
        self._last_used = [0] * n_rows
        self._clock = 0

    def reusable(self, row: int, held: Sequence[int], prompt: Sequence[int]) -> int:
        """How many of the prompt's first tokens row `row`, holding `held`, can serve. The last prompt
        token is always run again, for its logits."""
        n = _common_prefix(held, prompt[:-1])
        if self.ring_slots and self.written[row] > max(self.ring_slots, n + self.ring_reach):
            return 0
        return n

    def place(self, prompt: Sequence[int], reuse: bool, free: Sequence[int], held: Sequence[Sequence[int]]) -> Placement:
        """The placement of a prompt: the free row it takes and the row (free or running) that
        serves its longest reusable prefix. held: every row's tokens (free rows': kept)."""
        source, n_cached = -1, 0
        if reuse:
            for row, tokens in enumerate(held):
                n = self.reusable(row, tokens, prompt)
                if n > n_cached:
                    source, n_cached = row, n

        def eviction_order(row: int):
            # Rows whose tokens the prompt starts with lose nothing (the source first: the copy is
            # then in place); then the least recently used.
            if _common_prefix(held[row], prompt) == len(held[row]):
                return (0, row != source, row)
            return (1, self._last_used[row], row)

        return Placement(min(free, key=eviction_order), source, n_cached)

    def filled(self, placement: Placement, n_positions: int) -> None:
        """A prompt of n_positions was placed; its row now holds what the prefill wrote, and a
        copied prefix brings the source row's stale positions past it along."""
        source_written = self.written[placement.source] if placement.n_cached else 0
        self.written[placement.row] = max(n_positions, source_written)
        self.kept[placement.row] = ()
        self._touch(placement.row)
        if placement.n_cached:
            self._touch(placement.source)

    def wrote(self, row: int, bound: int) -> None:
        """A compiled call may write the row's positions below `bound`."""
        self.written[row] = max(self.written[row], bound)

    def released(self, row: int, tokens: Sequence[int]) -> None:
        """The row's sequence left; its KV is kept for the tokens given (none: unknown contents)."""
        self.kept[row] = tuple(tokens)
        self._touch(row)

    def _touch(self, row: int) -> None:
        self._clock += 1
        self._last_used[row] = self._clock


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
