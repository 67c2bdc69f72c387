"""Text to token ids and back, with the ids llama.cpp produces for the same GGUF vocabulary."""

import codecs
import itertools
import re
import sys
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

from rz.errors import TokenizerError
from rz.tokenizer.bpe import bpe_merge, merge_ranks
from rz.tokenizer.codepoints import CHAR_TO_BYTE, byte_encode
from rz.tokenizer.long_texts import LONG_TEXT_CHARS, LONG_TEXTS
from rz.tokenizer.special import SpecialTokenSplitter
from rz.tokenizer.spm import byte_token_ids, score_ranks, spm_merge, spm_token_ids
from rz.tokenizer.vocab import SPM, TokenAttr, Vocab, read_vocab

SPM_SPACE = "\u2581"  # "▁": SentencePiece's visible space
# Memoised words are dropped wholesale past this many bytes (as _cache_cost counts them),
# bounding memory on endless distinct text; a word longer than _CACHED_WORD_CHARS is never kept
# (it is rarely seen twice, and one such word would crowd out thousands of common ones).
_WORD_CACHE_BYTES = 32 << 20
_CACHED_WORD_CHARS = 256


_TOKENIZER_KEYS = itertools.count()


class Tokenizer:
    """A GGUF vocabulary's tokenizer: SentencePiece ("llama") or byte-level BPE ("gpt2")."""

    def __init__(self, vocab: Vocab):
        self._vocab = vocab
        self._key = next(_TOKENIZER_KEYS)  # names this vocabulary to the long-text child
        self._pieces: list[bytes | None] = [None] * vocab.size
        self._word_ids: dict[str, tuple[int, ...]] = {}
        self._word_cache_bytes = 0
        if vocab.kind == SPM:
            self._score_ranks = score_ranks(vocab.scores)
            self._byte_ids = byte_token_ids(vocab.token_to_id)
            self._spm_chunk_bridges = _spm_chunk_bridges(vocab.tokens)
        else:
            self._ranks = merge_ranks(vocab.merges)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> "Tokenizer":
        """The tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata."""
        return cls(read_vocab(metadata))

    @property
    def kind(self) -> str:
        """SentencePiece ("spm", tokenizer.ggml.model "llama") or byte-level BPE ("bpe", "gpt2")."""
        return self._vocab.kind

    @property
    def pre(self) -> str | None:
        """The BPE pre-tokenizer's name ("default" when the file names none); None for SentencePiece."""
        return self._vocab.pre_tokenizer.name if self._vocab.pre_tokenizer else None

    @property
    def vocab(self) -> Vocab:
        """The GGUF vocabulary: token texts and attributes (what a constrained-decoding library compiles against)."""
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return self._vocab.size

    @property
    def bos_id(self) -> int | None:
        return self._vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self._vocab.eos_id

    @property
    def eot_id(self) -> int | None:
        """The end-of-turn token (Gemma's <end_of_turn>, ChatML's <|im_end|>), if the vocabulary has one."""
        return self._vocab.eot_id

    @property
    def eog_ids(self) -> frozenset[int]:
        """Every token that ends a generation, as llama.cpp's llama_vocab_is_eog decides."""
        return self._vocab.eog_ids

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """text as token ids.

        add_bos: None adds the BOS (and EOS) the model asks for, like llama.cpp's add_special;
        True always starts with BOS; False adds no special token at all.
        special: parse control tokens written in the text (e.g. "<start_of_turn>") into their
        ids; user-defined tokens are always parsed, as in llama.cpp.
        """
        _check_encodable(text)
        if len(text) <= LONG_TEXT_CHARS:
            return self._encode(text, add_bos, special)
        return LONG_TEXTS.encode(self._key, self._vocab, text, add_bos, special)

    def encode_here(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """encode(), computed in the calling thread whatever the text's length (the long-text child uses it)."""
        _check_encodable(text)
        return self._encode(text, add_bos, special)

    def _encode(self, text: str, add_bos: bool | None, special: bool) -> list[int]:
        vocab = self._vocab
        ids: list[int] = []
        if add_bos is not False and (add_bos or vocab.add_bos):
            if vocab.bos_id is None:
                raise TokenizerError("this vocabulary has no BOS token; encode with add_bos=False")
            ids.append(vocab.bos_id)
        splitter = self._control_splitter if special else self._user_defined_splitter
        fragments = splitter.split(text)
        if vocab.kind == SPM:
            self._encode_spm(fragments, ids)
        else:
            for fragment in fragments:
                if isinstance(fragment, int):
                    ids.append(fragment)
                else:
                    self._encode_bpe(fragment, ids)
        if add_bos is not False and vocab.add_eos:
            if vocab.eos_id is None:
                raise TokenizerError("this vocabulary asks for an EOS token but has none")
            ids.append(vocab.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ids, as llama-cpp-python's Llama.detokenize renders it.

        Control tokens render as nothing; when the first id is BOS, one leading space of the
        text is dropped (the space SentencePiece prepends); bytes that are not valid UTF-8
        become U+FFFD.
        """
        text = b"".join(self.token_to_piece(token_id) for token_id in ids)
        if len(ids) > 0 and ids[0] == self.bos_id and text[:1] == b" ":
            text = text[1:]
        return text.decode("utf-8", errors="replace")

    def token_to_piece(self, token_id: int) -> bytes:
        """The bytes one token stands for (empty for control tokens), as llama.cpp's token_to_piece."""
        if not 0 <= token_id < self._vocab.size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary [0, {self._vocab.size})")
        piece = self._pieces[token_id]
        if piece is None:
            piece = self._pieces[token_id] = self._render_piece(token_id)
        return piece

    def _render_piece(self, token_id: int) -> bytes:
        attr = int(self._vocab.attrs[token_id])
        text = self._vocab.tokens[token_id]
        if attr & (TokenAttr.UNKNOWN | TokenAttr.CONTROL):
            return b""
        if attr & TokenAttr.USER_DEFINED:
            return text.encode("utf-8")
        if attr & TokenAttr.NORMAL:
            if self.kind == SPM:
                return text.replace(SPM_SPACE, " ").encode("utf-8")
            return _gpt2_decode(text)
        if attr & TokenAttr.BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                raise TokenizerError(f"byte token {token_id} is spelled {text!r}, not <0xXX>") from None
        return b""

    @cached_property
    def _control_splitter(self) -> SpecialTokenSplitter:
        return SpecialTokenSplitter(self._vocab.special_token_ids(), self._vocab.tokens)

    @cached_property
    def _user_defined_splitter(self) -> SpecialTokenSplitter:
        # Without `special`, llama.cpp still cuts out user-defined tokens, but not control or unknown ones.
        hidden = TokenAttr.CONTROL | TokenAttr.UNKNOWN
        ids = [token_id for token_id in self._vocab.special_token_ids() if not self._vocab.attrs[token_id] & hidden]
        return SpecialTokenSplitter(ids, self._vocab.tokens)

    def _encode_spm(self, fragments: list, ids: list[int]) -> None:
        vocab = self._vocab
        # llama.cpp prefixes a space to the text at the start and after every special token.
        after_special = True
        for fragment in fragments:
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
                continue
            if vocab.add_space_prefix and after_special:
                fragment = " " + fragment
            after_special = False
            for chunk in self._spm_chunks(fragment.replace(" ", SPM_SPACE)):
                chunk_ids = self._word_ids.get(chunk)
                if chunk_ids is None:
                    parts = spm_merge(chunk, vocab.token_to_id, self._score_ranks)
                    chunk_ids = self._remember(chunk, spm_token_ids(parts, vocab.token_to_id, self._byte_ids))
                ids.extend(chunk_ids)

    def _spm_chunks(self, text: str) -> list[str]:
        """text cut before each "▁" that follows another character, where no token spans the cut.

        Merging only ever joins neighbours into a vocabulary token, so a cut no token can span
        splits the text into pieces that merge independently: same ids, and reusable pieces.
        """
        cuts = [match.start() for match in _SPM_WORD_START.finditer(text)]
        if self._spm_chunk_bridges is not None and cuts:
            spanned = set()
            for match in self._spm_chunk_bridges.finditer(text):
                start = match.start()
                spanned.update(range(start + 1, start + len(match.group(1))))
            cuts = [cut for cut in cuts if cut not in spanned]
        bounds = [0, *cuts, len(text)]
        return [text[start:end] for start, end in zip(bounds, bounds[1:])]

    def _encode_bpe(self, text: str, ids: list[int]) -> None:
        word_ids = self._word_ids
        for word in self._vocab.pre_tokenizer.split(text):
            cached = word_ids.get(word)
            ids.extend(cached if cached is not None else self._remember(word, self._bpe_word_ids(word)))

    def _bpe_word_ids(self, word: str) -> list[int]:
        token_to_id = self._vocab.token_to_id
        encoded = byte_encode(word)
        if self._vocab.pre_tokenizer.ignore_merges and encoded in token_to_id:
            return [token_to_id[encoded]]
        ids = []
        for part in bpe_merge(encoded, self._ranks):
            token_id = token_to_id.get(part)
            if token_id is not None:
                ids.append(token_id)
                continue
            # llama.cpp spells a part that is not a token with the one-byte tokens it finds and
            # silently drops the other bytes; only an ASCII byte can be a one-byte token.
            for byte in part.encode("utf-8"):
                byte_id = token_to_id.get(chr(byte)) if byte < 0x80 else None
                if byte_id is not None:
                    ids.append(byte_id)
        return ids

    def _remember(self, word: str, ids: list[int]) -> tuple[int, ...]:
        ids = tuple(ids)
        if len(word) > _CACHED_WORD_CHARS:
            return ids
        cost = _cache_cost(word, ids)
        if self._word_cache_bytes + cost > _WORD_CACHE_BYTES:
            self._word_ids.clear()
            self._word_cache_bytes = 0
        self._word_ids[word] = ids
        self._word_cache_bytes += cost
        return ids


def _cache_cost(word: str, ids: tuple[int, ...]) -> int:
    """Bytes a cache entry holds: the key, the tuple, and about a dict slot (the ids themselves are
    the vocabulary's int objects, shared)."""
    return sys.getsizeof(word) + sys.getsizeof(ids) + 100


class IncrementalDecoder:
    """Turns a stream of token ids into text as it becomes complete UTF-8.

    The concatenated output equals tokenizer.decode(all ids); bytes of a character split
    across tokens are held back until the character is complete.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._seen_first_id = False
        self._drop_leading_space = False

    def add(self, token_id: int) -> str:
        """The text that token_id completes (possibly empty)."""
        piece = self._tokenizer.token_to_piece(token_id)
        if not self._seen_first_id:
            self._seen_first_id = True
            self._drop_leading_space = token_id == self._tokenizer.bos_id
        if self._drop_leading_space and piece:
            self._drop_leading_space = False
            if piece[:1] == b" ":
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is still held back, with an unfinished character as U+FFFD."""
        return self._utf8.decode(b"", final=True)


_SPM_WORD_START = re.compile(f"(?<=[^{SPM_SPACE}]){SPM_SPACE}")
_SPM_BRIDGE = re.compile(f"[^{SPM_SPACE}]{SPM_SPACE}")


def _spm_chunk_bridges(tokens: list[str]) -> re.Pattern | None:
    """A regex finding, at each position, the longest token that spans a "▁" chunk cut; None if none can."""
    bridges = sorted(filter(_SPM_BRIDGE.search, tokens), key=len, reverse=True)
    if not bridges:
        return None
    return re.compile("(?=(" + "|".join(map(re.escape, bridges)) + "))")


def _gpt2_decode(text: str) -> bytes:
    """A byte-level BPE token's bytes; a character outside GPT-2's byte map is written as llama.cpp does."""
    out = bytearray()
    for char in text:
        byte = CHAR_TO_BYTE.get(char)
        if byte is not None:
            out.append(byte)
        else:
            utf8 = char.encode("utf-8")
            out += b"[UNK_BYTE_0x" + utf8.hex().encode() + text.encode("utf-8") + b"]"
    return bytes(out)


def _check_encodable(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise TokenizerError(
                f"the text holds a lone surrogate {text[error.start]!r} at index {error.start}: it is not valid Unicode"
            ) from None
