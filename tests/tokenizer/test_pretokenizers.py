"""Every BPE pre-tokenizer family and SentencePiece's defaults, checked against llama.cpp.

The files are written here: SmolLM2's vocabulary and merges under each `tokenizer.ggml.pre`,
and a 32k-token slice of Gemma 3's SentencePiece vocabulary with Llama 2's defaults (a space
prefix, BOS) because the file leaves them unset. No special ids are written either, so
llama.cpp's per-kind defaults are under test too.
"""

import warnings
import zlib

import pytest
from tokenizer_cases import CORPUS, encoding_mismatches, fuzz_texts

from rz.errors import TokenizerError
from rz.tokenizer import Tokenizer
from rz.tokenizer.codepoints import BYTE_TO_CHAR
from rz.tokenizer.pretokenizers import SUPPORTED_PRE_TOKENIZERS, pre_tokenizer

# One name per distinct behaviour (regexes, merge and BOS defaults) of the names rz accepts.
PRE_TOKENIZERS_UNDER_TEST = [
    "default", "llama-bpe", "dbrx", "chatglm-bpe", "glm4", "gpt-2", "phi-2", "qwen2",
    "starcoder", "smollm", "deepseek-llm", "deepseek-coder", "gpt-4o",
]  # fmt: skip


def _bpe_vocab(metadata: dict, pre: str | None) -> dict:
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    vocab = {"tokenizer.ggml.model": "gpt2", **{key: metadata[key] for key in keys}}
    if pre is not None:
        vocab["tokenizer.ggml.pre"] = pre
    return vocab


@pytest.fixture(scope="module", params=PRE_TOKENIZERS_UNDER_TEST)
def bpe_model(request, smollm2_metadata, tmp_path_factory, write_vocab_gguf, load_model):
    pre = request.param
    path = write_vocab_gguf(tmp_path_factory.mktemp("vocab") / f"{pre}.gguf", _bpe_vocab(smollm2_metadata, pre))
    return load_model(f"smollm2-vocab/{pre}", path)


def test_bpe_pre_tokenizer_matches_llama_cpp(bpe_model):
    texts = CORPUS + fuzz_texts(100, seed=zlib.crc32(bpe_model.name.encode()))
    failures = encoding_mismatches(bpe_model, texts)
    assert not failures, f"{len(failures)} mismatches, first ones:\n" + "\n".join(failures[:5])


def test_missing_pre_tokenizer_falls_back_to_default_loudly(smollm2_metadata, tmp_path, write_vocab_gguf, load_model):
    path = write_vocab_gguf(tmp_path / "no-pre.gguf", _bpe_vocab(smollm2_metadata, None))
    with pytest.warns(UserWarning, match="no tokenizer.ggml.pre"):
        model = load_model("smollm2-vocab/no-pre", path)
    assert model.rz.pre == "default"
    texts = CORPUS[:60]
    failures = encoding_mismatches(model, texts)
    assert not failures, "\n".join(failures[:5])


def test_spm_with_llama2_defaults_matches_llama_cpp(gemma3_metadata, tmp_path, write_vocab_gguf, load_model):
    size = 32000
    vocab = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": gemma3_metadata["tokenizer.ggml.tokens"][:size],
        "tokenizer.ggml.scores": gemma3_metadata["tokenizer.ggml.scores"][:size],
        "tokenizer.ggml.token_type": gemma3_metadata["tokenizer.ggml.token_type"][:size],
    }
    model = load_model("gemma3-slice/llama2-defaults", write_vocab_gguf(tmp_path / "spm.gguf", vocab))
    assert model.rz.kind == "spm" and model.rz.pre is None
    failures = encoding_mismatches(model, CORPUS + fuzz_texts(150, seed=99))
    assert not failures, f"{len(failures)} mismatches, first ones:\n" + "\n".join(failures[:5])


def test_unknown_pre_tokenizer_is_an_error(smollm2_metadata):
    with pytest.raises(TokenizerError, match="unsupported BPE pre-tokenizer.*'no-such-pre'"):
        Tokenizer.from_gguf_metadata(_bpe_vocab(smollm2_metadata, "no-such-pre"))


@pytest.mark.parametrize("name", sorted(SUPPORTED_PRE_TOKENIZERS))
def test_every_supported_name_resolves(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolved = pre_tokenizer(name)
    assert resolved.name == name and resolved.steps
    assert "".join(resolved.split("It's 2024: héllo  wörld 你好\r\n\tx ")) == "It's 2024: héllo  wörld 你好\r\n\tx "


def test_hand_made_bpe_vocabulary_matches_llama_cpp(tmp_path, write_vocab_gguf, load_model):
    # A merge whose result is not a token (here "abc", "Ġa" and "éé") leaves llama.cpp to
    # spell the part with one-byte tokens, dropping the bytes that have none. User-defined
    # "BCD" is cut out of the text before the shorter "AB", even where "AB" comes first.
    tokens = ["<|endoftext|>", *BYTE_TO_CHAR, "ab", "Ã©", "AB", "BCD"]
    vocab = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 3) + [4, 4],
        "tokenizer.ggml.merges": ["a b", "ab c", "Ġ a", "Ã ©", "Ã© Ã©"],
    }
    model = load_model("hand-made-bpe", write_vocab_gguf(tmp_path / "bpe.gguf", vocab))
    texts = ["abc", "abcd abc", " a", "é", "éé", "ééé x", "<|endoftext|>ab", "ABCD", "xABCDAB", "ABAB"]
    failures = encoding_mismatches(model, texts)
    assert not failures, "\n".join(failures)
    assert model.rz.encode("ABCD", add_bos=False) == [tokens.index("A"), tokens.index("BCD")]
