"""Loading GGUF tensors into rz_kernels.quants' layout: the loader's checks and errors around it."""

import math

import jax
import numpy as np

from rz.errors import GGUFError, UnsupportedModelError
from rz_kernels.ggml_types import BLOCK_GEOMETRY, GGMLType, tensor_nbytes
from rz_kernels.quants import FORMATS, SUPPORTED_TYPES, Format, QTensor, aligned_empty, dequantize


def _format_of(ggml_type: GGMLType | int) -> tuple[GGMLType, Format]:
    try:
        ggml_type = GGMLType(ggml_type)
    except ValueError:
        raise UnsupportedModelError(f"unknown GGML tensor type {ggml_type}") from None
    if ggml_type not in FORMATS:
        supported = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise UnsupportedModelError(
            f"tensor type {ggml_type.name} is not supported; rz reads {supported}: "
            "requantize the model to one of these (for example with llama-quantize)"
        )
    return ggml_type, FORMATS[ggml_type]


def pack_host(raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, ...]) -> QTensor:
    """Repack a tensor's GGUF bytes into the layout table's arrays, as NumPy arrays on the host.

    raw holds the tensor's bytes in any dtype (a memmap view is read once and never kept);
    shape is in NumPy order, the contracted dimension last.
    """
    ggml_type, fmt = _format_of(ggml_type)
    shape = tuple(int(n) for n in shape)
    block = BLOCK_GEOMETRY[ggml_type]
    if not shape or shape[-1] % block.block_size:
        raise GGUFError(
            f"{ggml_type.name} tensor of shape {shape}: the last dimension must be a positive multiple "
            f"of the block size {block.block_size}"
        )
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    expected = tensor_nbytes(ggml_type, math.prod(shape))
    if raw.size != expected:
        raise GGUFError(
            f"{ggml_type.name} tensor of shape {shape} takes {expected} bytes, got {raw.size}: "
            "the tensor data is truncated or its type or shape is wrong"
        )
    rows, n_blocks = shape[:-1], shape[-1] // block.block_size
    blocks = raw.reshape(*rows, n_blocks, block.type_size)
    arrays = {}
    for field in fmt.fields:
        array = aligned_empty((*rows, n_blocks * field.items_per_block), np.dtype(field.dtype))
        per_block = array.reshape(*rows, n_blocks, field.items_per_block)
        np.copyto(per_block, field.extract(blocks), casting="equiv")
        arrays[field.name] = array
    return QTensor(arrays, ggml_type, shape)


def pack(raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, ...], device=None) -> QTensor:
    """Repack a tensor's GGUF bytes (see pack_host) and put the arrays on device (a Device or Sharding).

    On CPU the aligned host arrays are adopted without a copy.
    """
    return jax.device_put(pack_host(raw, ggml_type, shape), device)


def dequantize_raw(raw: np.ndarray, ggml_type: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize a tensor's GGUF bytes to an f32 NumPy array of `shape`."""
    return np.asarray(dequantize(pack(raw, ggml_type, shape)))


