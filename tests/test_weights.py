"""rz.weights: each weight declared once, and the file checked against that declaration."""

from pathlib import Path

import numpy as np
import pytest

from rz.config import ModelConfig
from rz.errors import GGUFError
from rz.gguf import GGUFFile
from rz.model_files import smollm2_135m_path
from rz.weights import AttentionProjections, attention_projections, load_weights, matrix, optional, vector
from rz_kernels.quants import QTensor


@pytest.fixture(scope="module")
def gguf():
    with GGUFFile(smollm2_135m_path()) as gguf:
        yield gguf


@pytest.fixture(scope="module")
def cfg(gguf):
    return ModelConfig.from_gguf(gguf)


def test_a_missing_tensor_is_named(gguf):
    with pytest.raises(GGUFError, match="missing tensor 'blk.0.no_such.weight'"):
        load_weights(gguf, matrix("blk.0.no_such.weight", 4, 4))


def test_a_tensor_of_another_shape_than_declared_is_refused(gguf, cfg):
    with pytest.raises(GGUFError, match="token_embd.weight.*expected"):
        load_weights(gguf, matrix("token_embd.weight", cfg.n_vocab, cfg.n_embd + 1))


def test_an_absent_optional_tensor_loads_as_none(gguf):
    assert load_weights(gguf, {"bias": optional(vector("blk.0.attn_q.bias", 8))}) == {"bias": None}


def test_a_tensor_declared_twice_is_loaded_once(gguf, cfg):
    spec = matrix("token_embd.weight", cfg.n_vocab, cfg.n_embd)
    first, second = load_weights(gguf, (spec, spec))
    assert first is second and isinstance(first, QTensor)


def test_attention_projections_load_with_their_declared_shapes(gguf, cfg):
    qkv = load_weights(gguf, attention_projections(0, cfg))
    assert isinstance(qkv, AttentionProjections)
    assert qkv.wq.shape == (cfg.n_head * cfg.head_dim, cfg.n_embd)
    assert qkv.wk.shape == qkv.wv.shape == (cfg.n_head_kv * cfg.head_dim, cfg.n_embd)
    assert (qkv.bq, qkv.bk, qkv.bv) == (None, None, None)  # SmolLM2 has no q/k/v biases


def test_vectors_load_as_f32(gguf, cfg):
    norm = load_weights(gguf, vector("output_norm.weight", cfg.n_embd))
    assert norm.dtype == np.float32 and norm.shape == (cfg.n_embd,)


def _resident_bytes_of_mapping(path) -> int:
    """Resident bytes of this process's mappings of the file at path (/proc/self/smaps)."""
    resident, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            resident += int(fields[1]) * 1024
    return resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_loading_gives_back_each_tensors_file_pages_as_it_goes():
    """While a model loads, the file's pages do not pile up next to the loaded weights."""
    from rz.models import load_model

    path = smollm2_135m_path().resolve()
    with GGUFFile(path) as gguf:
        model = load_model(gguf, ModelConfig.from_gguf(gguf))
        assert _resident_bytes_of_mapping(path) < gguf.file_size // 10
        # The bytes are still there to read: the pages come back from the file.
        name = "token_embd.weight"
        with open(path, "rb") as file:
            file.seek(gguf.tensors[name].offset)
            assert gguf.tensor_bytes(name)[:64].tobytes() == file.read(64)
    del model
