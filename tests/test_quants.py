"""rz.quants: bit-exact dequantization against gguf-py, the packed layout, and the errors."""

import ctypes
import math

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

from rz.errors import GGUFError, UnsupportedModelError
from rz_kernels.ggml_types import BLOCK_GEOMETRY, GGMLType, tensor_nbytes
from rz.gguf import GGUFFile
from rz.model_files import gemma3_270m_path, smollm2_135m_path
from rz.quants import dequantize_raw, pack, pack_host
from rz_kernels.quants import SUPPORTED_TYPES, QTensor, dequantize, qmatmul_ref
from support.kernels import F16_SCALE_OFFSETS

ALL_TYPES = sorted(SUPPORTED_TYPES, key=lambda t: t.value)

# Random bytes at a block's f16 scales could be inf or NaN, so the random-block tests write
# finite f16 values at these offsets (shared with the kernel tests).
F16_OFFSETS = F16_SCALE_OFFSETS

# Shapes in units of the block size along K: one block, one row, odd row counts, a 3-D tensor.
SHAPES_IN_BLOCKS = [(1,), (1, 1), (3, 2), (7, 1), (2, 3, 4)]


def gguf_reference(raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's dequantization of raw, as f32 [*shape]."""
    rows = raw.reshape(-1).view(np.uint8).reshape(*shape[:-1], -1)
    return gguf_dequantize(rows, gguf.GGMLQuantizationType(ggml_type.value)).reshape(shape)


def assert_bit_exact(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype == np.float32
    if not np.array_equal(actual.view(np.uint32), expected.view(np.uint32)):
        # Report the differing values; equal values with different bits can only be signed zeros.
        np.testing.assert_array_equal(actual, expected)
        np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


F16_EXPONENT_BITS = 0x7C00
BF16_EXPONENT_BITS = 0x7F80


def random_finite_bits(rng: np.random.Generator, n: int, exponent_bits=F16_EXPONENT_BITS) -> np.ndarray:
    """n random 16-bit float bit patterns, all finite: every exponent, subnormals, signed zeros."""
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    # Clearing the exponent's top bit turns an inf or NaN into a finite value.
    bits[(bits & exponent_bits) == exponent_bits] ^= 0x4000
    return bits


def random_tensor_bytes(rng: np.random.Generator, ggml_type: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Random bytes for a tensor of ggml_type, with every float in them finite."""
    n_elements = math.prod(shape)
    if ggml_type == GGMLType.F32:
        return rng.standard_normal(n_elements, dtype=np.float32).view(np.uint8)
    if ggml_type == GGMLType.F16:
        return random_finite_bits(rng, n_elements).view(np.uint8)
    if ggml_type == GGMLType.BF16:
        return random_finite_bits(rng, n_elements, BF16_EXPONENT_BITS).view(np.uint8)
    block = BLOCK_GEOMETRY[ggml_type]
    n_blocks = n_elements // block.block_size
    blocks = rng.integers(0, 256, (n_blocks, block.type_size), dtype=np.uint8)
    for offset in F16_OFFSETS[ggml_type]:
        blocks[:, offset : offset + 2] = random_finite_bits(rng, n_blocks).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


@pytest.mark.parametrize("shape_in_blocks", SHAPES_IN_BLOCKS, ids=str)
@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf_py(ggml_type, shape_in_blocks):
    block_size = BLOCK_GEOMETRY[ggml_type].block_size
    shape = (*shape_in_blocks[:-1], shape_in_blocks[-1] * block_size)
    rng = np.random.default_rng([ggml_type.value, *shape])
    raw = random_tensor_bytes(rng, ggml_type, shape)
    assert_bit_exact(dequantize_raw(raw, ggml_type, shape), gguf_reference(raw, ggml_type, shape))


# The layout table of rz.quants' docstring, as (dtype, width per K elements): the contract kernels read.
EXPECTED_LAYOUT = {
    GGMLType.F32: {"values": (np.float32, 1)},
    GGMLType.F16: {"values": (np.float16, 1)},
    GGMLType.BF16: {"values": (jnp.bfloat16, 1)},
    GGMLType.Q4_0: {"qs": (np.uint8, 1 / 2), "d": (np.float16, 1 / 32)},
    GGMLType.Q4_1: {"qs": (np.uint8, 1 / 2), "d": (np.float16, 1 / 32), "m": (np.float16, 1 / 32)},
    GGMLType.Q5_0: {"qs": (np.uint8, 1 / 2), "qh": (np.uint32, 1 / 32), "d": (np.float16, 1 / 32)},
    GGMLType.Q5_1: {
        "qs": (np.uint8, 1 / 2),
        "qh": (np.uint32, 1 / 32),
        "d": (np.float16, 1 / 32),
        "m": (np.float16, 1 / 32),
    },
    GGMLType.Q8_0: {"qs": (np.int8, 1), "d": (np.float16, 1 / 32)},
    GGMLType.Q2_K: {
        "qs": (np.uint8, 1 / 4),
        "scales_mins": (np.uint8, 1 / 16),
        "d": (np.float16, 1 / 256),
        "dmin": (np.float16, 1 / 256),
    },
    GGMLType.Q3_K: {
        "qs": (np.uint8, 1 / 4),
        "qh": (np.uint8, 1 / 8),
        "scales": (np.int8, 1 / 16),
        "d": (np.float16, 1 / 256),
    },
    GGMLType.Q4_K: {
        "qs": (np.uint8, 1 / 2),
        "scales": (np.uint8, 1 / 32),
        "mins": (np.uint8, 1 / 32),
        "d": (np.float16, 1 / 256),
        "dmin": (np.float16, 1 / 256),
    },
    GGMLType.Q5_K: {
        "qs": (np.uint8, 1 / 2),
        "qh": (np.uint8, 1 / 8),
        "scales": (np.uint8, 1 / 32),
        "mins": (np.uint8, 1 / 32),
        "d": (np.float16, 1 / 256),
        "dmin": (np.float16, 1 / 256),
    },
    GGMLType.Q6_K: {
        "qs": (np.uint8, 1 / 2),
        "qh": (np.uint8, 1 / 4),
        "scales": (np.int8, 1 / 16),
        "d": (np.float16, 1 / 256),
    },
    GGMLType.IQ4_NL: {"qs": (np.uint8, 1 / 2), "d": (np.float16, 1 / 32)},
    GGMLType.IQ4_XS: {"qs": (np.uint8, 1 / 2), "scales": (np.int8, 1 / 32), "d": (np.float16, 1 / 256)},
}


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_layout_is_the_documented_one_aligned_and_near_gguf_size(ggml_type):
    shape = (3, 2, 1024)
    raw = random_tensor_bytes(np.random.default_rng(0), ggml_type, shape)
    qt = pack_host(raw, ggml_type, shape)
    layout = {name: (array.dtype, array.shape) for name, array in qt.arrays.items()}
    documented = EXPECTED_LAYOUT[ggml_type].items()
    assert layout == {name: (np.dtype(dtype), (3, 2, int(1024 * width))) for name, (dtype, width) in documented}
    assert all(array.ctypes.data % 64 == 0 for array in qt.arrays.values())
    # The largest overhead is Q3_K's unpacked sub-scales: 114 bytes per 110.
    assert qt.nbytes <= 1.04 * raw.nbytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="only a CPU device can adopt host memory")
def test_pack_adopts_the_host_arrays_without_copying():
    shape = (8, 2048)
    raw = random_tensor_bytes(np.random.default_rng(8), GGMLType.Q4_K, shape)
    host = pack_host(raw, GGMLType.Q4_K, shape)
    device = jax.device_put(host)
    for name, array in host.arrays.items():
        assert device.arrays[name].unsafe_buffer_pointer() == array.ctypes.data, name


def test_quant_bytes_are_kept_in_ggml_order():
    """Kernels rely on qs being the GGUF quant bytes verbatim (low nibble j, high nibble j + 16)."""
    shape = (2, 64)
    raw = random_tensor_bytes(np.random.default_rng(1), GGMLType.Q4_0, shape)
    qt = pack_host(raw, GGMLType.Q4_0, shape)
    blocks = raw.reshape(2, 2, 18)
    np.testing.assert_array_equal(qt.arrays["qs"], blocks[..., 2:].reshape(2, 32))
    np.testing.assert_array_equal(qt.arrays["d"], blocks[..., :2].copy().view(np.float16)[..., 0])


def test_k_quant_sub_scales_are_unpacked():
    shape = (1, 512)
    raw = random_tensor_bytes(np.random.default_rng(2), GGMLType.Q4_K, shape)
    qt = pack_host(raw, GGMLType.Q4_K, shape)
    expected_scales, expected_mins = gguf.quants.Q4_K.get_scale_min(raw.reshape(2, 144)[:, 4:16])
    np.testing.assert_array_equal(qt.arrays["scales"], expected_scales.reshape(1, 16))
    np.testing.assert_array_equal(qt.arrays["mins"], expected_mins.reshape(1, 16))


def test_qtensor_is_a_pytree_with_static_type_and_shape():
    shape = (4, 256)
    raw = random_tensor_bytes(np.random.default_rng(3), GGMLType.Q6_K, shape)
    qt = pack(raw, GGMLType.Q6_K, shape)
    other = pack(random_tensor_bytes(np.random.default_rng(4), GGMLType.Q6_K, shape), GGMLType.Q6_K, shape)
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    assert treedef == jax.tree_util.tree_structure(other)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves) and len(leaves) == len(qt.arrays)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, QTensor) and rebuilt.ggml_type == GGMLType.Q6_K and rebuilt.shape == shape
    doubled = jax.jit(lambda q: 2 * dequantize(q))(qt)
    np.testing.assert_array_equal(np.asarray(doubled), 2 * gguf_reference(raw, GGMLType.Q6_K, shape))


def test_qmatmul_ref_agrees_with_numpy():
    shape = (5, 512)
    raw = random_tensor_bytes(np.random.default_rng(5), GGMLType.Q4_K, shape)
    x = np.random.default_rng(6).standard_normal((2, 3, 512), dtype=np.float32)
    out = qmatmul_ref(jnp.asarray(x), pack(raw, GGMLType.Q4_K, shape))
    expected = x.astype(np.float64) @ gguf_reference(raw, GGMLType.Q4_K, shape).T.astype(np.float64)
    assert out.shape == (2, 3, 5) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("ggml_type", [GGMLType.IQ2_XXS, GGMLType.Q8_K, GGMLType.TQ1_0, 99], ids=str)
def test_unsupported_type_is_named(ggml_type):
    name = ggml_type.name if isinstance(ggml_type, GGMLType) else str(ggml_type)
    with pytest.raises(UnsupportedModelError, match=name):
        pack(np.zeros(1024, np.uint8), ggml_type, (256,))


def test_wrong_byte_count_is_a_gguf_error():
    expected = tensor_nbytes(GGMLType.Q4_K, 2 * 256)
    with pytest.raises(GGUFError, match=f"takes {expected} bytes, got {expected - 1}"):
        pack(np.zeros(expected - 1, np.uint8), GGMLType.Q4_K, (2, 256))


def test_row_not_a_whole_number_of_blocks_is_a_gguf_error():
    with pytest.raises(GGUFError, match="multiple of the block size 32"):
        pack(np.zeros(18, np.uint8), GGMLType.Q4_0, (1, 16))


# ---------------------------------------------------------------------------------------------
# Real models: every tensor, whole, checked in row chunks so memory stays bounded.

CHUNK_ELEMENTS = 1 << 23


def check_gguf_file(path) -> set[GGMLType]:
    """Check every tensor of the GGUF file at path against gguf-py; return the types seen."""
    seen = set()
    with GGUFFile(path) as gguf_file:
        for name, info in gguf_file.tensors.items():
            k = info.shape[-1]
            rows = gguf_file.tensor_bytes(name).reshape(-1, tensor_nbytes(info.ggml_type, k))
            # A fixed chunk height means one compilation per (type, K) for the full chunks.
            chunk_rows = max(1, CHUNK_ELEMENTS // k)
            for start in range(0, rows.shape[0], chunk_rows):
                chunk = rows[start : start + chunk_rows]
                shape = (chunk.shape[0], k) if len(info.shape) > 1 else info.shape
                assert_bit_exact(
                    dequantize_raw(chunk, info.ggml_type, shape), gguf_reference(chunk, info.ggml_type, shape)
                )
            seen.add(info.ggml_type)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_path, expected_types",
    [
        (gemma3_270m_path, {GGMLType.F32, GGMLType.Q5_0, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0}),
        (smollm2_135m_path, {GGMLType.F32, GGMLType.Q4_1, GGMLType.Q8_0}),
    ],
    ids=["gemma3_270m", "smollm2_135m"],
)
def test_every_tensor_of_real_models_matches_gguf_py(model_path, expected_types):
    assert check_gguf_file(model_path()) == expected_types


# ---------------------------------------------------------------------------------------------
# Data from llama.cpp's own quantizer: a tiny F32 llama model quantized to each file type.

# Each llama.cpp file type and the tensor type it must produce; together they cover every
# supported type (F32 comes with every file: norms are never quantized).
FTYPE_MAIN_TYPES = {
    "Q2_K": GGMLType.Q2_K,
    "Q3_K_M": GGMLType.Q3_K,
    "Q4_K_M": GGMLType.Q4_K,
    "Q5_K_M": GGMLType.Q5_K,
    "Q6_K": GGMLType.Q6_K,
    "Q4_0": GGMLType.Q4_0,
    "Q4_1": GGMLType.Q4_1,
    "Q5_0": GGMLType.Q5_0,
    "Q5_1": GGMLType.Q5_1,
    "Q8_0": GGMLType.Q8_0,
    "IQ4_NL": GGMLType.IQ4_NL,
    "IQ4_XS": GGMLType.IQ4_XS,
    "F16": GGMLType.F16,
    "BF16": GGMLType.BF16,
}


def test_llama_cpp_file_types_cover_every_supported_type():
    assert {*FTYPE_MAIN_TYPES.values(), GGMLType.F32} == SUPPORTED_TYPES


def tiny_llama_weight(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random rows of very different magnitudes, plus an all-zero row, a constant row and an outlier."""
    weight = rng.standard_normal(shape) * np.exp(rng.normal(-3.0, 1.5, (shape[0], 1)))
    weight[0] = 0.0
    weight[1] = -0.25
    weight[2, 7] = 50.0
    return weight.astype(np.float32)


@pytest.fixture(scope="module")
def tiny_f32_llama(tmp_path_factory):
    """A one-layer F32 llama GGUF with every row a multiple of 256, so every K-quant applies."""
    n_embd, n_ff, n_vocab = 256, 512, 256
    path = tmp_path_factory.mktemp("tiny_llama") / "tiny-f32.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(1)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    rng = np.random.default_rng(7)
    matrices = {
        "token_embd": (n_vocab, n_embd),
        "output": (n_vocab, n_embd),
        "blk.0.attn_q": (n_embd, n_embd),
        "blk.0.attn_k": (n_embd, n_embd),
        "blk.0.attn_v": (n_embd, n_embd),
        "blk.0.attn_output": (n_embd, n_embd),
        "blk.0.ffn_gate": (n_ff, n_embd),
        "blk.0.ffn_up": (n_ff, n_embd),
        "blk.0.ffn_down": (n_embd, n_ff),
    }
    for name, shape in matrices.items():
        writer.add_tensor(f"{name}.weight", tiny_llama_weight(rng, shape))
    for name in ("output_norm", "blk.0.attn_norm", "blk.0.ffn_norm"):
        writer.add_tensor(f"{name}.weight", rng.standard_normal(n_embd).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("ftype", FTYPE_MAIN_TYPES)
def test_llama_cpp_quantized_tensors_match_gguf_py(tiny_f32_llama, ftype):
    llama_cpp = pytest.importorskip("llama_cpp")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    quantized = tiny_f32_llama.with_name(f"tiny-{ftype}.gguf")
    status = llama_cpp.llama_model_quantize(
        str(tiny_f32_llama).encode(), str(quantized).encode(), ctypes.byref(params)
    )
    assert status == 0, f"llama_model_quantize to {ftype} failed"
    assert FTYPE_MAIN_TYPES[ftype] in check_gguf_file(quantized)
