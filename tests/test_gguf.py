"""The GGUF reader: real files read right, and every malformed file ends in a GGUFError."""

import os
import re
import struct
import time

import gguf as gguf_py
import numpy as np
import pytest

from rz.config import SUPPORTED_ARCHITECTURES, ModelConfig
from rz.errors import GGUFError, UnsupportedModelError
from rz_kernels.ggml_types import GGMLType
from rz.gguf import GGUFFile
from rz.model_files import gemma3_270m_path, smollm2_135m_path

REAL_MODELS = {"gemma3": gemma3_270m_path, "smollm2": smollm2_135m_path}


@pytest.fixture(scope="module", params=sorted(REAL_MODELS))
def real_model(request):
    return REAL_MODELS[request.param]()


def test_reader_agrees_with_gguf_py_on_real_models(real_model):
    ours = GGUFFile(real_model)
    theirs = gguf_py.GGUFReader(real_model)
    assert set(ours.tensors) == {t.name for t in theirs.tensors}
    for tensor in theirs.tensors:
        info = ours.tensors[tensor.name]
        assert info.ggml_type == GGMLType(int(tensor.tensor_type))
        assert info.shape == tuple(int(n) for n in reversed(tensor.shape))
        assert info.offset == tensor.data_offset
        assert info.nbytes == tensor.n_bytes
        np.testing.assert_array_equal(ours.tensor_bytes(tensor.name)[:4096], tensor.data.view(np.uint8).reshape(-1)[:4096])
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        assert key in ours.metadata
        value = field.contents()
        if isinstance(value, list):
            assert list(np.asarray(ours.metadata[key]).tolist()) == value, key
        elif isinstance(value, float):
            assert ours.metadata[key] == pytest.approx(value), key
        else:
            assert ours.metadata[key] == value, key


def test_tensor_bytes_are_a_view_not_a_copy(real_model):
    gguf = GGUFFile(real_model)
    view = gguf.tensor_bytes("token_embd.weight")
    assert not view.flags.owndata and not view.flags.writeable


def _resident_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_released_pages_leave_resident_memory_and_read_back_the_same(real_model):
    gguf = GGUFFile(real_model)
    view = gguf.tensor_bytes("token_embd.weight")
    before = view.copy()  # touches every page of the tensor
    touched = _resident_file_kib()
    gguf.release_pages()
    assert touched - _resident_file_kib() >= view.nbytes // 1024 // 2
    np.testing.assert_array_equal(view, before)  # read back from the page cache


def test_config_of_real_models():
    gemma = ModelConfig.from_gguf(GGUFFile(gemma3_270m_path()))
    assert (gemma.architecture, gemma.n_layer, gemma.n_embd, gemma.n_head, gemma.n_head_kv) == ("gemma3", 18, 640, 4, 1)
    assert gemma.head_dim == 256 and gemma.sliding_window == 512 and gemma.tie_embeddings
    # Every sixth Gemma 3 layer is global; the rest slide.
    assert [i for i, sliding in enumerate(gemma.sliding_layers) if not sliding] == [5, 11, 17]
    smol = ModelConfig.from_gguf(GGUFFile(smollm2_135m_path()))
    assert (smol.architecture, smol.n_layer, smol.n_head, smol.n_head_kv, smol.head_dim) == ("llama", 30, 9, 3, 64)
    assert not any(smol.sliding_layers) and smol.chat_template


def _write_gguf(path, arch="llama", tensors=(("w", np.ones((4, 32), np.float32)),), drop=()):
    writer = gguf_py.GGUFWriter(str(path), arch)
    fields = {
        "add_context_length": 64,
        "add_embedding_length": 32,
        "add_block_count": 1,
        "add_feed_forward_length": 64,
        "add_head_count": 2,
    }
    for method, value in fields.items():
        if method not in drop:
            getattr(writer, method)(value)
    writer.add_token_list(["a", "b"])
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _expect_error(path, *fragments):
    with pytest.raises(GGUFError) as error:
        GGUFFile(path)
    message = str(error.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_magic(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    _expect_error(path, "bad magic")


def test_unsupported_version(tmp_path):
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    _expect_error(path, "unsupported GGUF version 1")


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    _expect_error(empty, "empty")
    _expect_error(tmp_path / "missing.gguf", "cannot open")


def test_truncated_header(tmp_path):
    path = _write_gguf(tmp_path / "full.gguf")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:40])
    _expect_error(cut, "truncated header")


def test_truncated_tensor_data(tmp_path):
    path = _write_gguf(tmp_path / "full.gguf")
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-10])
    _expect_error(cut, "'w'", "past the end of the file")


def test_unknown_tensor_type_is_named(tmp_path):
    path = _write_gguf(tmp_path / "full.gguf")
    data = bytearray(path.read_bytes())
    # The tensor entry ends with type (u32) and offset (u64); the name 'w' precedes its dims.
    entry = data.index(struct.pack("<Q", 1) + b"w")
    type_at = entry + 8 + 1 + 4 + 2 * 8
    assert struct.unpack_from("<I", data, type_at)[0] == GGMLType.F32
    struct.pack_into("<I", data, type_at, 99)
    path.write_bytes(bytes(data))
    _expect_error(path, "unknown tensor type 99")


def test_tensor_offset_outside_file(tmp_path):
    path = _write_gguf(tmp_path / "full.gguf")
    data = bytearray(path.read_bytes())
    entry = data.index(struct.pack("<Q", 1) + b"w")
    offset_at = entry + 8 + 1 + 4 + 2 * 8 + 4
    struct.pack_into("<Q", data, offset_at, 1 << 40)
    path.write_bytes(bytes(data))
    _expect_error(path, "past the end of the file")


def test_missing_required_metadata(tmp_path):
    path = _write_gguf(tmp_path / "nohead.gguf", drop=("add_embedding_length",))
    with pytest.raises(GGUFError, match="missing required metadata 'llama.embedding_length'"):
        ModelConfig.from_gguf(GGUFFile(path))


def test_unsupported_architecture(tmp_path):
    path = _write_gguf(tmp_path / "mamba.gguf", arch="mamba")
    with pytest.raises(UnsupportedModelError, match="'mamba'.*" + re.escape(", ".join(SUPPORTED_ARCHITECTURES))):
        ModelConfig.from_gguf(GGUFFile(path))


def _header_length(path) -> int:
    gguf = GGUFFile(path)
    return gguf.data_offset


def _load_everything(path) -> None:
    gguf = GGUFFile(path)
    ModelConfig.from_gguf(gguf)
    for name in gguf.tensors:
        gguf.tensor_bytes(name)


def _mutations(rng, header: bytes, file_size: int, count: int):
    """Seeded variants of a real file: (header bytes, file length) pairs.

    The reader never looks inside tensor data (GGUF has no checksums), so the data section is
    stood in for by a sparse extension of the file to its original (or a truncated) length.
    """
    for _ in range(count):
        kind = rng.integers(4)
        data = bytearray(header)
        length = file_size
        if kind == 0:  # truncate anywhere in the file
            length = int(rng.integers(0, file_size))
        elif kind == 1:  # flip random bytes in the header
            for at in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
                data[at] = int(rng.integers(256))
        elif kind == 2:  # overwrite a length/count/offset-like field with an extreme value
            at = int(rng.integers(0, len(data) - 8))
            extremes = [0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, int(rng.integers(2**40))]
            value = extremes[int(rng.integers(len(extremes)))]
            struct.pack_into("<Q", data, at, value)
        else:  # truncate within the header itself
            length = int(rng.integers(0, len(header)))
        yield bytes(data[: min(length, len(data))]), length


@pytest.mark.slow
@pytest.mark.parametrize("model, count", [("smollm2", 800), ("gemma3", 200)])
def test_fuzzed_real_files_load_or_raise_gguf_error(tmp_path, model, count):
    source = REAL_MODELS[model]()
    file_size = os.path.getsize(source)
    with open(source, "rb") as file:
        header = file.read(_header_length(source))
    rng = np.random.default_rng(1234)
    outcomes = {"loaded": 0, "rejected": 0}
    variant = tmp_path / "variant.gguf"
    for data, length in _mutations(rng, header, file_size, count):
        with open(variant, "wb") as file:
            file.write(data)
            file.truncate(length)
        # CPU time, not wall time: the bound is against hangs and runaway work in the reader,
        # not against other processes sharing the machine.
        start = time.process_time()
        try:
            _load_everything(variant)
            outcomes["loaded"] += 1
        except GGUFError as error:
            assert str(variant) in str(error)
            outcomes["rejected"] += 1
        except UnsupportedModelError:
            outcomes["rejected"] += 1
        assert time.process_time() - start < 1.0
    assert outcomes["loaded"] > 0 and outcomes["rejected"] > 0, outcomes


# Every hyperparameter ModelConfig reads, and values a hostile or broken file might hold there.
CONFIG_KEYS = (
    "embedding_length", "attention.head_count", "attention.head_count_kv", "block_count", "attention.key_length",
    "attention.value_length", "context_length", "attention.sliding_window", "attention.sliding_window_pattern",
    "rope.freq_base_swa", "rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon",
    "rope.scaling.type", "rope.scaling.factor", "vocab_size", "feed_forward_length", "rope.dimension_count",
    "rope.scaling.original_context_length", "rope.scaling.attn_factor", "attn_logit_softcapping",
    "final_logit_softcapping",
)
HOSTILE_VALUES = (
    0, 1, 2, 3, 7, -1, 2**31, 2**32 - 1, 2**63, -(2**63), np.uint64(2**64 - 1), np.int32(-5), np.float32(0.5),
    0.0, -0.0, 1e-300, -1e-9, 1.0, 1e308, float("nan"), float("inf"), -float("inf"), True, "yarn", "", "x" * 100,
    [1, 2], np.array([0, 1] * 10, np.int32), np.array([], np.int32), None,
)
GENERAL_KEYS = ("tokenizer.ggml.tokens", "tokenizer.chat_template")


def _value_mutants(rng, metadata: dict, arch: str, count: int):
    """(key, value) edits of one, two or three hyperparameters (None: the key removed), seeded."""
    keys = [f"{arch}.{name}" for name in CONFIG_KEYS] + list(GENERAL_KEYS)
    for _ in range(count):
        edits = {}
        for _ in range(int(rng.integers(1, 4))):
            key = keys[int(rng.integers(len(keys)))]
            if rng.random() < 0.5:
                value = HOSTILE_VALUES[int(rng.integers(len(HOSTILE_VALUES)))]
            else:  # near the real value, where off-by-one and divisibility bugs live
                real = metadata.get(key, 2)
                value = type(real)(real * rng.choice([0, 1, 2, 3]) + rng.choice([-1, 0, 1])) if isinstance(real, (int, float, np.integer, np.floating)) and not isinstance(real, bool) else real
            edits[key] = value
        yield edits


@pytest.mark.parametrize("model, count", [("smollm2", 6000), ("gemma3", 4000)])
def test_hyperparameter_value_mutations_load_or_raise_a_clean_error(model, count):
    """10,000 files' worth of hostile metadata values: each config either loads with every value in
    range, or fails with a GGUFError naming the file; never another exception, runaway memory or time."""
    import copy
    import resource
    import math

    source = GGUFFile(REAL_MODELS[model]())
    arch = source.metadata["general.architecture"]
    rng = np.random.default_rng(99)
    outcomes = {"loads": 0, "clean error": 0}
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for edits in _value_mutants(rng, source.metadata, arch, count):
        variant = copy.copy(source)
        variant.metadata = dict(source.metadata)
        for key, value in edits.items():
            if value is None:
                variant.metadata.pop(key, None)
            else:
                variant.metadata[key] = value
        start = time.process_time()
        try:
            config = ModelConfig.from_gguf(variant)
        except (GGUFError, UnsupportedModelError) as error:
            assert str(variant.path) in str(error), error
            outcomes["clean error"] += 1
        else:
            outcomes["loads"] += 1
            assert min(config.n_embd, config.n_layer, config.n_head, config.head_dim, config.n_ff, config.context_length) >= 1
            assert config.n_head % config.n_head_kv == 0 and 2 <= config.rope_dim <= config.head_dim
            assert config.rope_dim % 2 == 0 and len(config.sliding_layers) == config.n_layer
            for value in (config.norm_eps, config.rope_base, config.rope_base_sliding, config.rope_scaling_factor):
                assert math.isfinite(value) and value > 0
        assert time.process_time() - start < 1.0, edits
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 512 << 10  # KiB
    assert outcomes["loads"] > 0 and outcomes["clean error"] > 0, outcomes
