"""Codepoint classes as llama.cpp's tokenizer sees them, and GPT-2's byte-to-character map.

llama.cpp classifies codepoints with tables generated from Unicode 15.1 (letter, number,
punctuation, mark, symbol, other; plus the White_Space property). With any other Unicode
version, characters added or changed since would split differently from llama.cpp, so rz
reads categories from a 15.1 database: the standard library's on Python 3.13, otherwise the
unicodedata2 15.1.0 package.

A "collapsed" text replaces each non-ASCII codepoint by one character that names its class,
exactly as llama.cpp does before running a \\p{..} regex, so plain `re` patterns over the
collapsed text reproduce llama.cpp's splits. ASCII stands for itself.
"""

import unicodedata

LLAMA_CPP_UNICODE_VERSION = "15.1.0"


def _unicode_database():
    if unicodedata.unidata_version == LLAMA_CPP_UNICODE_VERSION:
        return unicodedata
    try:
        import unicodedata2
    except ImportError:
        unicodedata2 = None
    if unicodedata2 is None or unicodedata2.unidata_version != LLAMA_CPP_UNICODE_VERSION:
        raise ImportError(
            f"rz's tokenizer needs Unicode {LLAMA_CPP_UNICODE_VERSION} character data, as llama.cpp uses; "
            f"this Python has {unicodedata.unidata_version}: pip install unicodedata2=={LLAMA_CPP_UNICODE_VERSION}"
        )
    return unicodedata2


_UNICODE = _unicode_database()

# Unicode's White_Space property: the set llama.cpp's flags mark is_whitespace.
WHITESPACE_CODEPOINTS = frozenset(
    [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680]
    + list(range(0x2000, 0x200B))
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)

# The collapsed alphabet for non-ASCII codepoints (llama.cpp's own choice of stand-ins).
COLLAPSED_WHITESPACE = "\x0b"
COLLAPSED_OTHER = "\xd0"
COLLAPSED_NUMBER = "\xd1"
COLLAPSED_LETTER = "\xd2"
COLLAPSED_PUNCTUATION = "\xd3"
COLLAPSED_MARK = "\xd4"
COLLAPSED_SYMBOL = "\xd5"

_COLLAPSED_BY_CATEGORY = {
    "N": COLLAPSED_NUMBER,
    "L": COLLAPSED_LETTER,
    "P": COLLAPSED_PUNCTUATION,
    "M": COLLAPSED_MARK,
    "S": COLLAPSED_SYMBOL,
}

# Character-class bodies for regexes over collapsed text, matching llama.cpp's \p{..} and \s.
LETTER_CLASS = "A-Za-z" + COLLAPSED_LETTER
NUMBER_CLASS = "0-9" + COLLAPSED_NUMBER
PUNCTUATION_CLASS = "!-#%-*,-/:-;?-@\\[-\\]_{}" + COLLAPSED_PUNCTUATION
# C-locale \s: the only whitespace std::regex knows; non-ASCII whitespace was collapsed to \x0b.
SPACE_CLASS = "\t\n\x0b\x0c\r "


def _collapsed_char(codepoint: int) -> str:
    if codepoint < 0x80:
        return chr(codepoint)
    if codepoint in WHITESPACE_CODEPOINTS:
        return COLLAPSED_WHITESPACE
    category = _UNICODE.category(chr(codepoint))
    return _COLLAPSED_BY_CATEGORY.get(category[0], COLLAPSED_OTHER)


class _CollapseTable(dict):
    """A str.translate table that classifies each codepoint the first time it is seen."""

    def __missing__(self, codepoint: int) -> str:
        value = self[codepoint] = _collapsed_char(codepoint)
        return value


class _WideTable(dict):
    """A str.translate table mapping non-ASCII whitespace to \\x0b and everything else to itself."""

    def __missing__(self, codepoint: int) -> int:
        value = self[codepoint] = 0x0B if codepoint >= 0x80 and codepoint in WHITESPACE_CODEPOINTS else codepoint
        return value


_COLLAPSE_TABLE = _CollapseTable()
_WIDE_TABLE = _WideTable()


def collapse(text: str) -> str:
    """Each non-ASCII codepoint replaced by the character naming its class (same length as text)."""
    return text.translate(_COLLAPSE_TABLE)


def widen(text: str) -> str:
    """text with non-ASCII whitespace replaced by \\x0b, as llama.cpp prepares it for std::wregex."""
    return text.translate(_WIDE_TABLE)


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's reversible byte-to-character map: printable Latin-1 bytes stand for themselves."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {byte: chr(byte) for byte in printable}
    next_codepoint = 0x100
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(next_codepoint)
            next_codepoint += 1
    return [chars[byte] for byte in range(256)]


BYTE_TO_CHAR = _gpt2_byte_chars()
CHAR_TO_BYTE = {char: byte for byte, char in enumerate(BYTE_TO_CHAR)}
# latin-1 decoding turns each byte into the codepoint of the same value; this table then maps it.
_LATIN1_TO_BYTE_CHAR = {byte: char for byte, char in enumerate(BYTE_TO_CHAR)}


def byte_encode(text: str) -> str:
    """text's UTF-8 bytes, each written as its GPT-2 byte character."""
    return text.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_BYTE_CHAR)
