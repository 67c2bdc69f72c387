"""Cutting special tokens written in the text out of it, as llama.cpp's tokenizer_st_partition does.

llama.cpp takes the special tokens longest first and, for each, splits every piece of text
not yet claimed at each occurrence, left to right. A longer token therefore wins over a
shorter one even when the shorter one occurs further left, which a single leftmost-match
regex would get wrong; this module replays the same sequence, but only for the tokens that
occur in the text at all, which one pass of a prefix-tree regex finds.
"""

import re
from collections.abc import Sequence

Fragment = str | int  # a piece of text still to tokenize, or a special token id


class SpecialTokenSplitter:
    """Splits text at the given special tokens (ids in llama.cpp's matching order)."""

    def __init__(self, token_ids: Sequence[int], tokens: Sequence[str]):
        self._order = {token_id: rank for rank, token_id in enumerate(token_ids)}
        self._id_by_text = {tokens[token_id]: token_id for token_id in token_ids}
        # A lookahead finds, at every position, the longest special token starting there.
        self._longest_at = re.compile(f"(?=({_prefix_tree_pattern(self._id_by_text)}))") if token_ids else None

    def split(self, text: str) -> list[Fragment]:
        """text as raw-text pieces (str) and special token ids (int), in order."""
        present = self._tokens_in(text)
        if not present:
            return [text] if text else []
        fragments: list[tuple[int, int] | int] = [(0, len(text))]
        for token_id, token_text in sorted(present, key=lambda item: self._order[item[0]]):
            fragments = _split_at(text, fragments, token_id, token_text)
        return [fragment if isinstance(fragment, int) else text[fragment[0] : fragment[1]] for fragment in fragments]

    def _tokens_in(self, text: str) -> list[tuple[int, str]]:
        if self._longest_at is None or not text:
            return []
        found = {match.group(1) for match in self._longest_at.finditer(text)}
        # A token the scan above missed occurs only as a prefix of a longer one it found.
        for longest in list(found):
            found.update(longest[:end] for end in range(1, len(longest)) if longest[:end] in self._id_by_text)
        return [(self._id_by_text[token_text], token_text) for token_text in found]


def _split_at(text: str, fragments: list, token_id: int, token_text: str) -> list:
    """fragments with every non-overlapping occurrence of token_text in a text piece cut out."""
    result = []
    width = len(token_text)
    for fragment in fragments:
        if isinstance(fragment, int):
            result.append(fragment)
            continue
        position, end = fragment
        while (found := text.find(token_text, position, end)) >= 0:
            if found > position:
                result.append((position, found))
            result.append(token_id)
            position = found + width
        if position < end:
            result.append((position, end))
    return result


def _prefix_tree_pattern(words) -> str:
    """A regex matching the longest of words at a position, shaped as a prefix tree so it runs fast."""
    tree: dict = {}
    for word in words:
        node = tree
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def render(node: dict) -> str:
        branches = []
        for char, child in node.items():
            if not char:
                continue
            # A run of single-child nodes becomes one literal, keeping the pattern shallow.
            run = char
            while len(child) == 1 and "" not in child:
                ((next_char, child),) = child.items()
                run += next_char
            branches.append(re.escape(run) + render(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Optional and greedy: the longer continuation is tried first, this end second.
        return f"(?:{body})?" if "" in node else body

    return render(tree)
