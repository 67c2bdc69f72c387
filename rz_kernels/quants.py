"""Quantized weights: GGUF blocks repacked once on the host into kernel-friendly arrays, dequantized in JAX.

GGUF stores a quantized row as a run of self-contained blocks, each interleaving float scales,
packed sub-block scales and packed quants. Kernels want the opposite: one array per kind of
data, so a tile of quants is one contiguous load and a tile of scales another. rz.quants.pack splits the
blocks once at load time; the weights stay quantized in memory (about the GGUF size, see
`QTensor.nbytes`), and `dequantize` / fused kernels decode them on the fly.

Layout, the contract kernels code against. A tensor of shape [*rows, K] (K = shape[-1], the
contracted dimension of a [N, K] weight) becomes a dict of arrays, every one shaped
[*rows, K // block_size * items_per_block], so a row's data is contiguous along K and any
block-aligned K tile maps to a tile of every array; the same sharding fits every array.

    type     array    dtype    width     meaning
    F32/F16  values   f32/f16  K         the weights themselves (BF16: bf16)
    Q4_0     qs       u8       K/2       4-bit quants, nibble-planar in groups of 32 (q - 8)
             d        f16      K/32      block scale
    Q4_1     qs, d    as Q4_0            4-bit quants (q, unsigned)
             m        f16      K/32      block minimum, added
    Q5_0     qs, d    as Q4_0            low 4 bits of the 5-bit quants (q - 16)
             qh       u32      K/32      bit i = high bit of the block's element i
    Q5_1     qs, qh, d, m                as Q5_0 plus Q4_1's m
    Q8_0     qs       i8       K         8-bit quants
             d        f16      K/32      block scale
    Q2_K     qs       u8       K/4       2-bit quants, bit-planar in groups of 128
             scales_mins u8    K/16      low nibble: sub-block scale, high nibble: its min
             d, dmin  f16      K/256     super-block scale and min scale
    Q3_K     qs       u8       K/4       low 2 bits, bit-planar in groups of 128
             qh       u8       K/8       high bit, bit-planar in groups of 256; q = low - 4 * (1 - high)
             scales   i8       K/16      sub-block scales, offset 32 already removed
             d        f16      K/256     super-block scale
    Q4_K     qs       u8       K/2       4-bit quants, nibble-planar in groups of 64
             scales   u8       K/32      6-bit sub-block scales, unpacked
             mins     u8       K/32      6-bit sub-block mins, unpacked
             d, dmin  f16      K/256     super-block scale and min scale; w = d*scale*q - dmin*min
    Q5_K     as Q4_K, plus qh u8 K/8     fifth bit, bit-planar in groups of 256
    Q6_K     qs       u8       K/2       low 4 bits, nibble-planar in groups of 128
             qh       u8       K/4       high 2 bits, bit-planar in groups of 128; q - 32
             scales   i8       K/16      sub-block scales
             d        f16      K/256     super-block scale
    IQ4_NL   qs, d    as Q4_0            4-bit indices into the 16-entry IQ4_NL_VALUES table
    IQ4_XS   qs       u8       K/2       4-bit indices, nibble-planar in groups of 32
             scales   i8       K/32      6-bit sub-block scales, offset 32 already removed
             d        f16      K/256     super-block scale

"Bit-planar in groups of G" with b-bit fields means: within each run of G elements, bits
[b*p, b*p + b) of byte j hold element p * (G*b/8) + j. This is ggml's own order (for nibbles
in groups of 32: low nibble = element j, high nibble = element j + 16), kept because
  - both fields of a byte fall in the same scale block for the 32-blocks, so a kernel applies
    one scale per byte;
  - unpacking a byte is a shift and a mask per plane, with no shuffle; a matmul kernel that
    would rather not interleave planes can permute its activations once instead (view x as
    [..., K/G, planes, G/planes]), so that each plane of a quant tile meets a contiguous x;
  - llama.cpp's CPU and GPU kernels read exactly this order, so their designs carry over;
  - repacking moves whole bytes only, so it cannot get the bits wrong.
Float scales keep their GGUF dtype (f16): widening is exact and one instruction in a kernel.
Packed 6-bit sub-scales are unpacked to one byte each, because their unpacking is the costly
shuffle; Q2_K's scale/min nibbles stay packed, since unpacking them to two bytes would cost
19% more memory and decoding a nibble is one shift.

`dequantize` reproduces gguf-py's `gguf.quants.dequantize` bit for bit, following its order of
float operations. Every product that feeds an add (d * scale, (d * scale) * q) is exact in f32
(an f16 significand times an integer of at most 6 bits, times one of at most 5 bits), so the
FMA contraction XLA applies on CPU and GPU cannot change a result.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rz_kernels.ggml_types import GGMLType

IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

# A cache line, and enough for XLA:CPU to adopt a host buffer without copying it.
_ALIGNMENT = 64


@partial(jax.tree_util.register_dataclass, data_fields=("arrays",), meta_fields=("ggml_type", "shape"))
@dataclass(frozen=True)
class QTensor:
    """A tensor kept in its quantized form: the arrays of the layout table above, keyed by name."""

    arrays: dict[str, jax.Array]
    ggml_type: GGMLType
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays: about the GGUF size of the tensor."""
        return sum(array.nbytes for array in self.arrays.values())


@partial(jax.tree_util.register_dataclass, data_fields=("arrays",), meta_fields=("ggml_type", "shape"))
@dataclass(frozen=True)
class QTensorStack:
    """One weight of several layers, stacked: each array of a QTensor's layout with a leading
    layer axis [L, ...]; `shape` is one layer's. A layer-indexed matmul
    (rz_kernels.quantized_matmul.qmatmul_stacked) reads its layer's slice in place."""

    arrays: dict[str, jax.Array]
    ggml_type: GGMLType
    shape: tuple[int, ...]

    @property
    def n_layers(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def layer(self, index: int) -> QTensor:
        """Layer `index`'s weight: a slice of every array (under jit a copy, unless it fuses)."""
        return QTensor({name: array[index] for name, array in self.arrays.items()}, self.ggml_type, self.shape)


def stack_in_place(weights: Sequence[QTensor]) -> tuple[QTensorStack, tuple[QTensor, ...]] | None:
    """The weights stacked into one buffer per array, and each weight again as views of its slice:
    the same bytes held once, reachable both ways. None where they cannot share it: their types or
    shapes differ, a layer's slice would not start on an _ALIGNMENT boundary, or the device does
    not adopt host buffers (JAX copies them to an accelerator)."""
    first = weights[0]
    if any(w.ggml_type != first.ggml_type or w.shape != first.shape or w.arrays.keys() != first.arrays.keys() for w in weights):
        return None
    stacked, views = {}, [{} for _ in weights]
    for name, array in first.arrays.items():
        if any(w.arrays[name].shape != array.shape or w.arrays[name].dtype != array.dtype for w in weights):
            return None
        if array.nbytes % _ALIGNMENT:
            return None
        host = aligned_empty((len(weights), *array.shape), np.dtype(array.dtype))
        for index, weight in enumerate(weights):
            host[index] = np.asarray(weight.arrays[name])
        stacked[name] = jax.device_put(host)
        for index in range(len(weights)):
            views[index][name] = jax.device_put(host[index])
        pointers = [view[name].unsafe_buffer_pointer() for view in views]
        if stacked[name].unsafe_buffer_pointer() != host.ctypes.data or pointers != [host[i].ctypes.data for i in range(len(weights))]:
            return None
    stack = QTensorStack(stacked, first.ggml_type, first.shape)
    return stack, tuple(QTensor(view, first.ggml_type, first.shape) for view in views)


# ---------------------------------------------------------------------------------------------
# Host side: cutting the arrays out of GGUF blocks.
#
# An extractor maps blocks [..., n_blocks, type_size] uint8 to [..., n_blocks, items_per_block].


@dataclass(frozen=True)
class _Field:
    """One array of the layout: items_per_block items of dtype per GGUF block, cut by extract."""

    name: str
    dtype: type
    items_per_block: int
    extract: Callable[[np.ndarray], np.ndarray]


def _stored(name: str, dtype: type, start: int, stop: int) -> _Field:
    """A field kept as GGUF stores it: the block bytes [start, stop) read as little-endian dtype."""
    little_endian = np.dtype(dtype).newbyteorder("<")
    items_per_block = (stop - start) // little_endian.itemsize
    return _Field(name, dtype, items_per_block, lambda blocks: blocks[..., start:stop].view(little_endian))


def _k_six_bit_values(six_bit_bytes: np.ndarray, nibbles: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's eight 6-bit sub-block scales (or mins) as [..., 8] uint8.

    Sub-blocks 0-3 keep all 6 bits in the low bits of four bytes; sub-blocks 4-7 keep their
    low 4 bits in four nibbles and their top 2 bits in the top bits of those same four bytes.
    """
    return np.concatenate([six_bit_bytes & 0x3F, nibbles | ((six_bit_bytes >> 6) << 4)], axis=-1)


def _k_scales(blocks: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K sub-block scales from blocks whose bytes 4-15 pack the scales and mins."""
    return _k_six_bit_values(blocks[..., 4:8], blocks[..., 12:16] & 0x0F)


def _k_mins(blocks: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K sub-block mins, from the same 12 bytes as _k_scales."""
    return _k_six_bit_values(blocks[..., 8:12], blocks[..., 12:16] >> 4)


def _q3_k_scales(blocks: np.ndarray) -> np.ndarray:
    """Q3_K's sixteen 6-bit sub-block scales (block bytes 96-107) as [..., 16] int8, offset 32 removed.

    Scale i has its low 4 bits in byte i % 8 (low nibble for i < 8, high nibble after) and its
    top 2 bits in byte 8 + i % 4, at bit 2 * (i // 4).
    """
    packed = blocks[..., 96:108]
    low = np.concatenate([packed[..., 0:8] & 0x0F, packed[..., 0:8] >> 4], axis=-1)
    high = np.concatenate([(packed[..., 8:12] >> shift) & 0x03 for shift in (0, 2, 4, 6)], axis=-1)
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def _iq4_xs_scales(blocks: np.ndarray) -> np.ndarray:
    """IQ4_XS's 6-bit sub-block scales -> [..., 8] int8 with the offset 32 removed.

    Scale i has its low 4 bits in nibble i of bytes 4-7 and its top 2 bits at bit 2i of the
    little-endian uint16 in bytes 2-3.
    """
    high_bits = blocks[..., 2:4].view("<u2")
    low_nibbles = blocks[..., 4:8]
    low = np.stack([low_nibbles & 0x0F, low_nibbles >> 4], axis=-1).reshape(*blocks.shape[:-1], 8)
    high = (high_bits >> (2 * np.arange(8, dtype=np.uint16))) & 0x03
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on an _ALIGNMENT boundary."""
    nbytes = math.prod(shape) * dtype.itemsize
    buffer = np.empty(nbytes + _ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % _ALIGNMENT
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------
# Device side: decoding the arrays to f32, each following gguf-py's order of float operations.


def _unpack_bits(packed: jax.Array, bits: int, group: int) -> jax.Array:
    """[..., n*bits/8] uint8, bit-planar in groups of `group` -> [..., n] uint8 field values."""
    bytes_per_group = group * bits // 8
    by_group = packed.reshape(*packed.shape[:-1], -1, 1, bytes_per_group)
    shifts = jnp.arange(0, 8, bits, dtype=jnp.uint8).reshape(-1, 1)
    return ((by_group >> shifts) & ((1 << bits) - 1)).reshape(*packed.shape[:-1], -1)


def _blocks(values: jax.Array, n_blocks: int) -> jax.Array:
    """[..., K] -> [..., n_blocks, K // n_blocks], so a per-block scale broadcasts over its block."""
    return values.reshape(*values.shape[:-1], n_blocks, -1)


def _f32(values: jax.Array) -> jax.Array:
    return values.astype(jnp.float32)


def _per_block(scale: jax.Array) -> jax.Array:
    """[..., n] per-block scales -> f32 [..., n, 1], to multiply a _blocks() view."""
    return _f32(scale)[..., None]


def _dequantize_float(a: dict[str, jax.Array]) -> jax.Array:
    return _f32(a["values"])


def _dequantize_q4_0(a: dict[str, jax.Array]) -> jax.Array:
    q = _unpack_bits(a["qs"], 4, 32).astype(jnp.int8) - 8
    return _per_block(a["d"]) * _f32(_blocks(q, a["d"].shape[-1]))


def _dequantize_q4_1(a: dict[str, jax.Array]) -> jax.Array:
    q = _f32(_blocks(_unpack_bits(a["qs"], 4, 32), a["d"].shape[-1]))
    return _per_block(a["d"]) * q + _per_block(a["m"])


def _q5_quants(a: dict[str, jax.Array]) -> jax.Array:
    """The unsigned 5-bit quants of Q5_0/Q5_1 as [..., n_blocks, 32] uint8."""
    low = _blocks(_unpack_bits(a["qs"], 4, 32), a["qh"].shape[-1])
    high = (a["qh"][..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return low | (high.astype(jnp.uint8) << 4)


def _dequantize_q5_0(a: dict[str, jax.Array]) -> jax.Array:
    q = _q5_quants(a).astype(jnp.int8) - 16
    return _per_block(a["d"]) * _f32(q)


def _dequantize_q5_1(a: dict[str, jax.Array]) -> jax.Array:
    return _per_block(a["d"]) * _f32(_q5_quants(a)) + _per_block(a["m"])


def _dequantize_q8_0(a: dict[str, jax.Array]) -> jax.Array:
    return _f32(_blocks(a["qs"], a["d"].shape[-1])) * _per_block(a["d"])


def _dequantize_q2_k(a: dict[str, jax.Array]) -> jax.Array:
    n_super = a["d"].shape[-1]
    scales_mins = _blocks(a["scales_mins"], n_super)
    sub_scale = (_per_block(a["d"]) * _f32(scales_mins & 0x0F))[..., None]
    sub_min = (_per_block(a["dmin"]) * _f32(scales_mins >> 4))[..., None]
    q = _f32(_unpack_bits(a["qs"], 2, 128)).reshape(*scales_mins.shape, -1)
    return sub_scale * q - sub_min


def _dequantize_q3_k(a: dict[str, jax.Array]) -> jax.Array:
    n_super = a["d"].shape[-1]
    sub_scale = (_per_block(a["d"]) * _f32(_blocks(a["scales"], n_super)))[..., None]
    low = _unpack_bits(a["qs"], 2, 128).astype(jnp.int8)
    # The high bit is stored inverted: a clear bit subtracts 4.
    offset = ((_unpack_bits(a["qh"], 1, 256) ^ 1) << 2).astype(jnp.int8)
    q = _f32(low - offset).reshape(*sub_scale.shape[:-1], -1)
    return sub_scale * q


def _k_quant_affine(a: dict[str, jax.Array], q: jax.Array) -> jax.Array:
    """Q4_K/Q5_K: d*scale*q - dmin*min per 32-element sub-block, q given as [..., K] uint8."""
    n_super = a["d"].shape[-1]
    sub_scale = (_per_block(a["d"]) * _f32(_blocks(a["scales"], n_super)))[..., None]
    sub_min = (_per_block(a["dmin"]) * _f32(_blocks(a["mins"], n_super)))[..., None]
    return sub_scale * _f32(q).reshape(*sub_scale.shape[:-1], -1) - sub_min


def _dequantize_q4_k(a: dict[str, jax.Array]) -> jax.Array:
    return _k_quant_affine(a, _unpack_bits(a["qs"], 4, 64))


def _dequantize_q5_k(a: dict[str, jax.Array]) -> jax.Array:
    q = _unpack_bits(a["qs"], 4, 64) | (_unpack_bits(a["qh"], 1, 256) << 4)
    return _k_quant_affine(a, q)


def _dequantize_q6_k(a: dict[str, jax.Array]) -> jax.Array:
    n_super = a["d"].shape[-1]
    sub_scale = (_per_block(a["d"]) * _f32(_blocks(a["scales"], n_super)))[..., None]
    q = (_unpack_bits(a["qs"], 4, 128) | (_unpack_bits(a["qh"], 2, 128) << 4)).astype(jnp.int8) - 32
    return sub_scale * _f32(q).reshape(*sub_scale.shape[:-1], -1)


def _iq4_values(qs: jax.Array) -> jax.Array:
    """4-bit IQ4 indices, nibble-planar in groups of 32 -> their f32 table values, [..., K]."""
    table = jnp.array(IQ4_NL_VALUES, dtype=jnp.float32)
    return table[_unpack_bits(qs, 4, 32)]


def _dequantize_iq4_nl(a: dict[str, jax.Array]) -> jax.Array:
    return _per_block(a["d"]) * _blocks(_iq4_values(a["qs"]), a["d"].shape[-1])


def _dequantize_iq4_xs(a: dict[str, jax.Array]) -> jax.Array:
    n_super = a["d"].shape[-1]
    sub_scale = (_per_block(a["d"]) * _f32(_blocks(a["scales"], n_super)))[..., None]
    return sub_scale * _iq4_values(a["qs"]).reshape(*sub_scale.shape[:-1], -1)


# ---------------------------------------------------------------------------------------------
# The table: each supported type's arrays and its decoder.


@dataclass(frozen=True)
class Format:
    """How one GGML type is repacked (its arrays, in block order) and decoded."""

    fields: tuple[_Field, ...]
    dequantize: Callable[[dict[str, jax.Array]], jax.Array]


def _float_format(dtype: type) -> Format:
    return Format((_stored("values", dtype, 0, np.dtype(dtype).itemsize),), _dequantize_float)


_Q4_0_FIELDS = (_stored("d", np.float16, 0, 2), _stored("qs", np.uint8, 2, 18))
_Q4_1_FIELDS = (
    _stored("d", np.float16, 0, 2),
    _stored("m", np.float16, 2, 4),
    _stored("qs", np.uint8, 4, 20),
)
_K_QUANT_SCALE_FIELDS = (
    _stored("d", np.float16, 0, 2),
    _stored("dmin", np.float16, 2, 4),
    _Field("scales", np.uint8, 8, _k_scales),
    _Field("mins", np.uint8, 8, _k_mins),
)

FORMATS: dict[GGMLType, Format] = {
    GGMLType.F32: _float_format(np.float32),
    GGMLType.F16: _float_format(np.float16),
    GGMLType.BF16: _float_format(jnp.bfloat16),
    GGMLType.Q4_0: Format(_Q4_0_FIELDS, _dequantize_q4_0),
    GGMLType.Q4_1: Format(_Q4_1_FIELDS, _dequantize_q4_1),
    GGMLType.Q5_0: Format(
        (
            _stored("d", np.float16, 0, 2),
            _stored("qh", np.uint32, 2, 6),
            _stored("qs", np.uint8, 6, 22),
        ),
        _dequantize_q5_0,
    ),
    GGMLType.Q5_1: Format(
        (
            _stored("d", np.float16, 0, 2),
            _stored("m", np.float16, 2, 4),
            _stored("qh", np.uint32, 4, 8),
            _stored("qs", np.uint8, 8, 24),
        ),
        _dequantize_q5_1,
    ),
    GGMLType.Q8_0: Format(
        (_stored("d", np.float16, 0, 2), _stored("qs", np.int8, 2, 34)),
        _dequantize_q8_0,
    ),
    GGMLType.Q2_K: Format(
        (
            _stored("scales_mins", np.uint8, 0, 16),
            _stored("qs", np.uint8, 16, 80),
            _stored("d", np.float16, 80, 82),
            _stored("dmin", np.float16, 82, 84),
        ),
        _dequantize_q2_k,
    ),
    GGMLType.Q3_K: Format(
        (
            _stored("qh", np.uint8, 0, 32),
            _stored("qs", np.uint8, 32, 96),
            _Field("scales", np.int8, 16, _q3_k_scales),
            _stored("d", np.float16, 108, 110),
        ),
        _dequantize_q3_k,
    ),
    GGMLType.Q4_K: Format(
        (*_K_QUANT_SCALE_FIELDS, _stored("qs", np.uint8, 16, 144)),
        _dequantize_q4_k,
    ),
    GGMLType.Q5_K: Format(
        (
            *_K_QUANT_SCALE_FIELDS,
            _stored("qh", np.uint8, 16, 48),
            _stored("qs", np.uint8, 48, 176),
        ),
        _dequantize_q5_k,
    ),
    GGMLType.Q6_K: Format(
        (
            _stored("qs", np.uint8, 0, 128),
            _stored("qh", np.uint8, 128, 192),
            _stored("scales", np.int8, 192, 208),
            _stored("d", np.float16, 208, 210),
        ),
        _dequantize_q6_k,
    ),
    GGMLType.IQ4_NL: Format(_Q4_0_FIELDS, _dequantize_iq4_nl),
    GGMLType.IQ4_XS: Format(
        (
            _stored("d", np.float16, 0, 2),
            _Field("scales", np.int8, 8, _iq4_xs_scales),
            _stored("qs", np.uint8, 8, 136),
        ),
        _dequantize_iq4_xs,
    ),
}

SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(FORMATS)


# ---------------------------------------------------------------------------------------------
# Public API.


@jax.jit
def dequantize(qt: QTensor) -> jax.Array:
    """The tensor's values as f32 [*shape], bit-identical to gguf.quants.dequantize."""
    return FORMATS[qt.ggml_type].dequantize(qt.arrays).reshape(qt.shape)


def qmatmul_ref(x: jax.Array, qt: QTensor) -> jax.Array:
    """x @ W.T for a quantized weight W [N, K]: x [..., K] -> f32 [..., N]. Fused kernels must match it."""
    if len(qt.shape) != 2:
        raise ValueError(f"qmatmul_ref needs a 2-D [N, K] weight, got shape {qt.shape}")
    w = dequantize(qt)
    return jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
