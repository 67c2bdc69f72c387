"""SentencePiece-style merging, in llama.cpp's order: highest-scoring pair of symbols first.

llama.cpp starts from single characters and repeatedly joins the adjacent pair whose
concatenation is a vocabulary token with the highest score (the leftmost among equal
scores); a character left that is not a token is written as its UTF-8 bytes (<0xXX>).
"""

import heapq
from collections.abc import Mapping, Sequence

from rz.errors import TokenizerError


def spm_merge(text: str, token_to_id: Mapping[str, int], scores: Sequence[float]) -> list[str]:
    """text's characters joined into vocabulary tokens; unjoinable characters stay alone."""
    count = len(text)
    if count < 2:
        return list(text)
    parts = list(text)
    following = list(range(1, count)) + [-1]
    preceding = list(range(-1, count - 1))
    # heapq is a min-heap: the negated score puts the best pair first, then the leftmost.
    heap = []
    for left in range(count - 1):
        token_id = token_to_id.get(parts[left] + parts[left + 1])
        if token_id is not None:
            heap.append((-scores[token_id], left, 2))
    heapq.heapify(heap)
    while heap:
        _, left, length = heapq.heappop(heap)
        right = following[left]
        # Parts only grow, so a pair queued before either side changed has the wrong length.
        if right < 0 or not parts[left] or len(parts[left]) + len(parts[right]) != length:
            continue
        merged = parts[left] + parts[right]
        parts[left] = merged
        parts[right] = ""
        following[left] = after = following[right]
        if after >= 0:
            preceding[after] = left
        before = preceding[left]
        if before >= 0:
            _queue_pair(heap, parts[before], merged, before, token_to_id, scores)
        if after >= 0:
            _queue_pair(heap, merged, parts[after], left, token_to_id, scores)
    return [part for part in parts if part]


def _queue_pair(heap: list, left_text: str, right_text: str, left: int, token_to_id, scores) -> None:
    token_id = token_to_id.get(left_text + right_text)
    if token_id is not None:
        heapq.heappush(heap, (-scores[token_id], left, len(left_text) + len(right_text)))


def byte_token_ids(token_to_id: Mapping[str, int]) -> list[int | None]:
    """The <0xXX> token of each byte value, None where the vocabulary lacks it."""
    return [token_to_id.get(f"<0x{byte:02X}>") for byte in range(256)]


def spm_token_ids(parts: list[str], token_to_id: Mapping[str, int], byte_ids: Sequence[int | None]) -> list[int]:
    """Merged parts as token ids, a part that is not a token as its UTF-8 byte tokens."""
    ids = []
    for part in parts:
        token_id = token_to_id.get(part)
        if token_id is not None:
            ids.append(token_id)
            continue
        for byte in part.encode("utf-8"):
            byte_id = byte_ids[byte]
            if byte_id is None:
                raise TokenizerError(
                    f"{part!r} is not in the vocabulary and the vocabulary has no byte token <0x{byte:02X}> to spell it"
                )
            ids.append(byte_id)
    return ids
