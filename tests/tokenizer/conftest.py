"""Shared fixtures for the tokenizer tests: model files, rz tokenizers, and llama.cpp as the oracle.

Every expected id comes from llama-cpp-python at test time. Loading a vocabulary in llama.cpp
takes up to a second or two (Gemma 3 has 262k tokens), so each real model is loaded once per
session. `load_model` and `write_vocab_gguf` let a test build its own vocabulary file.
"""

import ctypes
from dataclasses import dataclass
from pathlib import Path

import pytest

from rz.errors import RzError
from rz.gguf import GGUFFile
from rz.tokenizer import Tokenizer


class LlamaCppVocab:
    """llama.cpp's tokenizer for one GGUF file, through llama-cpp-python."""

    def __init__(self, path: Path):
        self._llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the oracle for token ids")
        self.llama = self._llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        self._vocab = self._llama_cpp.llama_model_get_vocab(self.llama.model)
        self.bos_id = self.llama.token_bos()
        self.add_bos = self._llama_cpp.llama_vocab_get_add_bos(self._vocab)
        self.eot_id = self._llama_cpp.llama_vocab_eot(self._vocab)

    def tokenize(self, text: str, add_special: bool, special: bool) -> list[int]:
        # llama-cpp-python's add_bos is llama.cpp's add_special: BOS and EOS as the model asks.
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=special)

    def token_to_piece(self, token_id: int) -> bytes:
        buffer = ctypes.create_string_buffer(256)
        length = self._llama_cpp.llama_token_to_piece(self._vocab, token_id, buffer, len(buffer), 0, False)
        assert 0 <= length <= len(buffer)
        return buffer.raw[:length]

    def detokenize(self, ids: list[int]) -> str:
        """Llama.detokenize's rendering (pieces joined, one leading space dropped after BOS).

        Llama.detokenize itself reads each piece through a 32-byte buffer and returns stale
        bytes for longer pieces (Gemma has Bengali and Devanagari tokens of up to 48 bytes),
        so this asks llama.cpp for each piece with room to spare.
        """
        text = b"".join(self.token_to_piece(token_id) for token_id in ids)
        if ids and ids[0] == self.bos_id and text[:1] == b" ":
            text = text[1:]
        return text.decode("utf-8", errors="replace")

    def is_eog(self, token_id: int) -> bool:
        return self._llama_cpp.llama_vocab_is_eog(self._vocab, token_id)


@dataclass
class ModelUnderTest:
    """One vocabulary as rz and as llama.cpp tokenize it."""

    name: str
    path: Path
    rz: Tokenizer
    reference: LlamaCppVocab


def _real_model_path(finder) -> Path:
    try:
        return finder()
    except RzError as error:
        pytest.skip(f"model package not installed: {error}")


def _load_model(name: str, path: Path) -> ModelUnderTest:
    """rz's tokenizer and llama.cpp's, both built from the GGUF file at path."""
    reference = LlamaCppVocab(path)
    with GGUFFile(path) as gguf_file:
        tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
    return ModelUnderTest(name, path, tokenizer, reference)


@pytest.fixture(scope="session")
def gemma3():
    from rz.model_files import gemma3_270m_path

    return _load_model("gemma3-270m", _real_model_path(gemma3_270m_path))


@pytest.fixture(scope="session")
def smollm2():
    from rz.model_files import smollm2_135m_path

    return _load_model("smollm2-135m", _real_model_path(smollm2_135m_path))


@pytest.fixture(scope="session")
def smollm2_metadata():
    from rz.model_files import smollm2_135m_path

    with GGUFFile(_real_model_path(smollm2_135m_path)) as gguf_file:
        return dict(gguf_file.metadata)


@pytest.fixture(scope="session")
def gemma3_metadata():
    from rz.model_files import gemma3_270m_path

    with GGUFFile(_real_model_path(gemma3_270m_path)) as gguf_file:
        return dict(gguf_file.metadata)


def _write_vocab_gguf(path: Path, tokenizer_metadata: dict) -> Path:
    """A weightless GGUF holding tokenizer_metadata: enough for llama.cpp's vocab_only load."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch="llama")
    # llama.cpp reads the architecture's hyperparameters even when it loads only the vocabulary.
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, value in tokenizer_metadata.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif key == "tokenizer.ggml.scores":
            writer.add_array(key, [float(score) for score in value])
        else:
            writer.add_array(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def load_model():
    """load_model(name, path): a GGUF file's vocabulary as a ModelUnderTest."""
    return _load_model


@pytest.fixture(scope="session")
def write_vocab_gguf():
    """write_vocab_gguf(path, tokenizer_metadata): a weightless GGUF that llama.cpp loads as a vocabulary."""
    return _write_vocab_gguf
