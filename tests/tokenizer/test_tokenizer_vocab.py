"""Special ids, end-of-generation sets and vocabulary errors, against llama.cpp where it decides."""

import numpy as np
import pytest

from rz.errors import TokenizerError
from rz.tokenizer import Tokenizer


@pytest.mark.parametrize("model_name", ["gemma3", "smollm2"])
def test_special_ids_match_llama_cpp(model_name, request):
    model = request.getfixturevalue(model_name)
    llama = model.reference.llama
    assert model.rz.vocab_size == llama.n_vocab()
    assert model.rz.bos_id == llama.token_bos()
    assert model.rz.eos_id == llama.token_eos()


@pytest.mark.parametrize("model_name", ["gemma3", "smollm2"])
def test_end_of_generation_ids_match_llama_cpp(model_name, request):
    model = request.getfixturevalue(model_name)
    expected = {token_id for token_id in range(model.rz.vocab_size) if model.reference.is_eog(token_id)}
    assert model.rz.eog_ids == expected


def test_gemma3_identity(gemma3):
    tokenizer = gemma3.rz
    assert (tokenizer.kind, tokenizer.pre) == ("spm", None)
    assert tokenizer.eot_id == gemma3.reference.eot_id == 106  # <end_of_turn>
    assert tokenizer.eog_ids == {1, 106, 212}  # <eos>, <end_of_turn>, and </s> as llama.cpp marks it


def test_smollm2_identity(smollm2):
    tokenizer = smollm2.rz
    assert (tokenizer.kind, tokenizer.pre) == ("bpe", "smollm")
    # The vocabulary has both <|endoftext|> (0) and <|im_end|> (2), and llama.cpp takes
    # whichever its hash map visits first (0 in this build); rz prefers <|im_end|>, the
    # end of a ChatML turn. Both end a generation either way.
    assert tokenizer.eot_id == 2
    assert smollm2.reference.eot_id in tokenizer.eog_ids


def _metadata(**overrides):
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.token_type": np.array([1, 1, 1], dtype=np.int32),
        "tokenizer.ggml.merges": ["a b"],
    }
    metadata.update(overrides)
    return {key: value for key, value in metadata.items() if value is not None}


def test_a_minimal_vocabulary_builds():
    tokenizer = Tokenizer.from_gguf_metadata(_metadata())
    assert tokenizer.encode("abba", add_bos=False) == [2, 1, 0]
    assert tokenizer.bos_id is None and tokenizer.eos_id is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tokenizer.ggml.model": None}, "no tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": "bert"}, "'bert' is not supported"),
        ({"tokenizer.ggml.tokens": None}, "no tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens is empty"),
        ({"tokenizer.ggml.tokens": ["a", "b", "a"]}, "1 duplicate token texts"),
        ({"tokenizer.ggml.merges": None}, "needs tokenizer.ggml.merges"),
        ({"tokenizer.ggml.token_type": np.array([1], dtype=np.int32)}, "token_type has 1 entries"),
        ({"tokenizer.ggml.pre": "gpt-5"}, "unsupported BPE pre-tokenizer"),
    ],
)
def test_unusable_vocabulary_is_a_tokenizer_error(overrides, message):
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_gguf_metadata(_metadata(**overrides))


def test_forcing_bos_without_one_is_an_error():
    tokenizer = Tokenizer.from_gguf_metadata(_metadata())
    with pytest.raises(TokenizerError, match="no BOS token"):
        tokenizer.encode("ab", add_bos=True)


def test_text_with_a_lone_surrogate_is_an_error():
    tokenizer = Tokenizer.from_gguf_metadata(_metadata())
    with pytest.raises(TokenizerError, match="lone surrogate"):
        tokenizer.encode("a\udc80b")
