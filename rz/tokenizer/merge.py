"""Pairwise merging of one word's symbols, in llama.cpp's order: the one algorithm behind BPE and SPM.

Both of llama.cpp's tokenizers start from single characters and repeatedly join one adjacent
pair: the pair with the best priority, the leftmost among equals, until no adjacent pair has a
priority. They differ only in what a pair's priority is: BPE's merge rank, SentencePiece's score
of the token the pair spells.

A queued pair is stale once either side has grown (parts only grow), which its length tells:
that is the check llama.cpp makes. Memory stays linear and lean for very long words (llama.cpp
does not split them, and neither does rz, so the ids stay llama.cpp's): the queue holds one
integer per pair, packing (priority, left position, length), and the linked list is two arrays of
machine integers.
"""

import heapq
from array import array
from collections.abc import Callable


def merge_pairs(word: str, priority: Callable[[str, str], int | None]) -> list[str]:
    """word's characters joined pairwise by priority(left, right) (lower first; None: never); the parts in order."""
    count = len(word)
    if count < 2:
        return list(word)
    parts = list(word)
    # Heap keys: (priority * span + left) * span + length, so the heap orders by priority, then position.
    span = count + 1
    # A doubly linked list over the parts; merged-away parts become "".
    following = array("q", range(1, count + 1))
    following[-1] = -1
    preceding = array("q", range(-1, count - 1))
    heap = []
    for left in range(count - 1):
        rank = priority(parts[left], parts[left + 1])
        if rank is not None:
            heap.append((rank * span + left) * span + 2)
    heapq.heapify(heap)
    while heap:
        key = heapq.heappop(heap)
        key, length = divmod(key, span)
        left = key % span
        right = following[left]
        if right < 0 or not parts[left] or len(parts[left]) + len(parts[right]) != length:
            continue
        merged = parts[left] = parts[left] + parts[right]
        parts[right] = ""
        following[left] = after = following[right]
        if after >= 0:
            preceding[after] = left
        before = preceding[left]
        if before >= 0:
            rank = priority(parts[before], merged)
            if rank is not None:
                heapq.heappush(heap, (rank * span + before) * span + len(parts[before]) + len(merged))
        if after >= 0:
            rank = priority(merged, parts[after])
            if rank is not None:
                heapq.heappush(heap, (rank * span + left) * span + len(merged) + len(parts[after]))
    return [part for part in parts if part]
