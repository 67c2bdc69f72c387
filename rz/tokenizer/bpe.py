"""Byte-pair merging of one pre-tokenized word, in llama.cpp's order.

llama.cpp merges one adjacent pair at a time: the pair with the lowest merge rank, the
leftmost among equal ranks, until no adjacent pair has a rank (rz.tokenizer.merge).
"""

from collections.abc import Mapping, Sequence

from rz.tokenizer.merge import merge_pairs


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
    return merge_pairs(word, lambda left, right: ranks.get((left, right)))
