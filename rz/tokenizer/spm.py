"""SentencePiece-style merging, in llama.cpp's order: highest-scoring pair of symbols first.

llama.cpp starts from single characters and repeatedly joins the adjacent pair whose
concatenation is a vocabulary token with the highest score (the leftmost among equal
scores, rz.tokenizer.merge); a character left that is not a token is written as its UTF-8
bytes (<0xXX>).
"""

from array import array
from collections.abc import Mapping, Sequence

import numpy as np

from rz.errors import TokenizerError
from rz.tokenizer.merge import merge_pairs


def score_ranks(scores: Sequence[float] | np.ndarray) -> array:
    """Each token's place in the order of scores, best first (equal scores share a place), as
    4-byte ints: as Python ints, a large vocabulary's ranks were megabytes of objects."""
    _, ranks = np.unique(-np.asarray(scores, np.float32), return_inverse=True)
    return array("i", ranks.astype(np.int32).tobytes())


def spm_merge(text: str, token_to_id: Mapping[str, int], ranks: Sequence[int]) -> list[str]:
    """text's characters joined into vocabulary tokens, best score first (ranks: score_ranks);
    unjoinable characters stay alone."""

    def priority(left: str, right: str) -> int | None:
        token_id = token_to_id.get(left + right)
        return None if token_id is None else ranks[token_id]

    return merge_pairs(text, priority)


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
