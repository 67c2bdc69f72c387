"""Byte-pair merging of one pre-tokenized word, in llama.cpp's order.

llama.cpp merges one adjacent pair at a time: the pair with the lowest merge rank, the
leftmost among equal ranks, until no adjacent pair has a rank.
"""

import heapq
from collections.abc import Mapping, Sequence


def merge_ranks(merges: Sequence[str]) -> dict[tuple[str, str], int]:
    """`tokenizer.ggml.merges` ("left right" lines) as a rank per pair; the first line of a pair wins."""
    ranks: dict[tuple[str, str], int] = {}
    for rank, line in enumerate(merges):
        # Split at the first space after the first character, as llama.cpp does, so a left
        # part that is itself a space survives; a line without one becomes the pair ("", "").
        cut = line.find(" ", 1)
        pair = (line[:cut], line[cut + 1 :]) if cut >= 0 else ("", "")
        ranks.setdefault(pair, rank)
    return ranks


def bpe_merge(word: str, ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """word's characters merged pairwise by rank; returns the merged parts in order."""
    count = len(word)
    if count < 2:
        return list(word)
    parts = list(word)
    # A doubly linked list over the parts; merged-away parts become "".
    following = list(range(1, count)) + [-1]
    preceding = list(range(-1, count - 1))
    heap = []
    for left in range(count - 1):
        rank = ranks.get((parts[left], parts[left + 1]))
        if rank is not None:
            heap.append((rank, left, parts[left] + parts[left + 1]))
    heapq.heapify(heap)
    while heap:
        _, left, merged = heapq.heappop(heap)
        right = following[left]
        # A pair queued before one of its sides changed no longer spells `merged`: skip it.
        if right < 0 or not parts[left] or parts[left] + parts[right] != merged:
            continue
        parts[left] = merged
        parts[right] = ""
        following[left] = after = following[right]
        if after >= 0:
            preceding[after] = left
        before = preceding[left]
        if before >= 0:
            rank = ranks.get((parts[before], merged))
            if rank is not None:
                heapq.heappush(heap, (rank, before, parts[before] + merged))
        if after >= 0:
            rank = ranks.get((merged, parts[after]))
            if rank is not None:
                heapq.heappush(heap, (rank, left, merged + parts[after]))
    return [part for part in parts if part]
