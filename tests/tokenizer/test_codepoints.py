"""Codepoint classes (llama.cpp's Unicode 15.1 tables) and GPT-2's byte characters."""

from rz.tokenizer.codepoints import (
    BYTE_TO_CHAR,
    CHAR_TO_BYTE,
    COLLAPSED_LETTER,
    COLLAPSED_MARK,
    COLLAPSED_NUMBER,
    COLLAPSED_OTHER,
    COLLAPSED_PUNCTUATION,
    COLLAPSED_SYMBOL,
    COLLAPSED_WHITESPACE,
    byte_encode,
    collapse,
    widen,
)


def test_collapse_names_each_codepoint_class_and_keeps_ascii():
    text = "aZ9 \t!é٣。\u0301€\u3000\u200b"
    expected = "aZ9 \t!" + COLLAPSED_LETTER + COLLAPSED_NUMBER + COLLAPSED_PUNCTUATION + COLLAPSED_MARK
    expected += COLLAPSED_SYMBOL + COLLAPSED_WHITESPACE + COLLAPSED_OTHER
    assert collapse(text) == expected


def test_classes_follow_unicode_15_1_like_llama_cpp():
    # U+2FFC was assigned in 15.1 and U+31350 in 15.0; U+10D40 only in 16.0.
    assert collapse("\u2ffc\U00031350\U00010d40") == COLLAPSED_SYMBOL + COLLAPSED_LETTER + COLLAPSED_OTHER


def test_widen_marks_only_non_ascii_whitespace():
    assert widen("a\u00a0b\u3000c\td\u2028") == "a\x0bb\x0bc\td\x0b"


def test_gpt2_byte_characters_are_a_bijection():
    assert len(set(BYTE_TO_CHAR)) == 256
    assert all(CHAR_TO_BYTE[char] == byte for byte, char in enumerate(BYTE_TO_CHAR))
    assert byte_encode("a é\n") == "aĠÃ©Ċ"
