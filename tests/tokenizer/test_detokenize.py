"""Detokenizing: whole sequences and single pieces as llama.cpp renders them, and streaming."""

import pytest
from tokenizer_cases import CORPUS, fuzz_texts

from rz.errors import TokenizerError
from rz.tokenizer import IncrementalDecoder

TEXTS = CORPUS + fuzz_texts(150, seed=77)


@pytest.fixture(scope="module", params=["gemma3", "smollm2"])
def model(request):
    return request.getfixturevalue(request.param)


def _id_sequences(model):
    for text in TEXTS:
        for special in (False, True):
            yield text, model.rz.encode(text, special=special)


def test_decode_matches_llama_cpp(model):
    failures = [
        f"{text!r}: rz {model.rz.decode(ids)!r} llama.cpp {model.reference.detokenize(ids)!r}"
        for text, ids in _id_sequences(model)
        if model.rz.decode(ids) != model.reference.detokenize(ids)
    ]
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures[:5])


def test_reference_detokenize_is_llama_cpp_pythons(model):
    # The oracle reimplements Llama.detokenize only to lift its 32-byte piece limit.
    for _, ids in _id_sequences(model):
        if all(len(model.reference.token_to_piece(token_id)) <= 32 for token_id in ids):
            expected = model.reference.llama.detokenize(ids).decode("utf-8", errors="replace")
            assert model.reference.detokenize(ids) == expected


def test_every_token_piece_matches_llama_cpp(model):
    failures = [
        token_id
        for token_id in range(model.rz.vocab_size)
        if model.rz.token_to_piece(token_id) != model.reference.token_to_piece(token_id)
    ]
    assert not failures, f"{len(failures)} pieces differ, e.g. ids {failures[:10]}"


def test_round_trip_keeps_text(model):
    for text in ["Hello world", "def f(x):\n\treturn x  # done\n", "héllo 你好 👨‍👩‍👧 ١٢٣"]:
        assert model.rz.decode(model.rz.encode(text, add_bos=False)) == text


def test_decode_rejects_an_id_outside_the_vocabulary(model):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        model.rz.decode([model.rz.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        model.rz.token_to_piece(-1)


def _stream(tokenizer, ids) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.add(token_id) for token_id in ids] + [decoder.flush()]


def test_incremental_decoder_streams_what_decode_returns(model):
    for text, ids in _id_sequences(model):
        chunks = _stream(model.rz, ids)
        whole = model.rz.decode(ids)
        assert "".join(chunks) == whole, text
        if "\ufffd" not in whole:
            # Nothing is emitted before its character is complete.
            assert not any("\ufffd" in chunk for chunk in chunks), text


def test_incremental_decoder_holds_back_a_character_split_across_byte_tokens(gemma3, smollm2):
    # SmolLM2 spells a rare emoji with byte-level pieces; Gemma falls back to <0xXX> tokens
    # for a character its vocabulary lacks (U+31350, a CJK Extension H ideograph).
    for tokenizer, char in ((smollm2.rz, "🫠"), (gemma3.rz, "\U00031350")):
        ids = tokenizer.encode(char, add_bos=False)
        assert len(ids) > 1, "the character should need several tokens"
        chunks = _stream(tokenizer, ids)
        assert chunks == [""] * (len(ids) - 1) + [char, ""]


def test_incremental_decoder_replaces_bytes_that_never_complete(gemma3):
    tokenizer = gemma3.rz
    first_byte_only = tokenizer.encode("\U00031350", add_bos=False)[:1]
    letter = tokenizer.encode("a", add_bos=False)
    ids = first_byte_only + letter
    assert _stream(tokenizer, ids) == ["", "\ufffda", ""]
    assert _stream(tokenizer, first_byte_only) == ["", "\ufffd"]
    assert tokenizer.decode(ids) == "\ufffda"


def test_incremental_decoder_drops_the_space_after_bos_like_decode(gemma3):
    tokenizer = gemma3.rz
    ids = tokenizer.encode(" Hi there")
    assert ids[0] == tokenizer.bos_id
    assert "".join(_stream(tokenizer, ids)) == tokenizer.decode(ids) == "Hi there"
    assert "".join(_stream(tokenizer, ids[1:])) == tokenizer.decode(ids[1:]) == " Hi there"
