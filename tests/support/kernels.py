"""Inputs for kernel tests and benchmarks: random and real quantized weights, activations, and NMSE."""

import math

import numpy as np

from rz.gguf import GGUFFile
from rz.quants import pack
from rz_kernels.ggml_types import BLOCK_GEOMETRY, GGMLType, tensor_nbytes
from rz_kernels.quants import QTensor

# Byte offsets of the f16 scales inside each type's GGUF block.
F16_SCALE_OFFSETS = {
    GGMLType.Q4_0: (0,),
    GGMLType.Q4_1: (0, 2),
    GGMLType.Q5_0: (0,),
    GGMLType.Q5_1: (0, 2),
    GGMLType.Q8_0: (0,),
    GGMLType.Q2_K: (80, 82),
    GGMLType.Q3_K: (108,),
    GGMLType.Q4_K: (0, 2),
    GGMLType.Q5_K: (0, 2),
    GGMLType.Q6_K: (208,),
    GGMLType.IQ4_NL: (0,),
    GGMLType.IQ4_XS: (0,),
}


def random_blocks(rng: np.random.Generator, ggml_type: GGMLType, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF bytes for a tensor of `shape`: random quants, f16 scales of random sign and size 1e-3..1e-1."""
    if ggml_type in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
        values = rng.standard_normal(math.prod(shape)).astype(np.float32) * 0.05
        return values.astype({GGMLType.F32: np.float32, GGMLType.F16: np.float16}.get(ggml_type, np.float32)).view(
            np.uint8
        )
    block = BLOCK_GEOMETRY[ggml_type]
    n_blocks = math.prod(shape) // block.block_size
    blocks = rng.integers(0, 256, (n_blocks, block.type_size), dtype=np.uint8)
    for offset in F16_SCALE_OFFSETS[ggml_type]:
        scales = rng.choice([-1.0, 1.0], n_blocks) * 10.0 ** rng.uniform(-3, -1, n_blocks)
        blocks[:, offset : offset + 2] = scales.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    return blocks.reshape(-1)


def random_qtensor(rng: np.random.Generator, ggml_type: GGMLType, shape: tuple[int, ...], device=None) -> QTensor:
    """A random QTensor of ggml_type and shape [..., K], packed by rz.quants.pack."""
    return pack(random_blocks(rng, ggml_type, shape), ggml_type, shape, device)


def real_qtensor(path, name: str, rows: int | None = None, device=None) -> QTensor:
    """The GGUF tensor `name` of the model file at `path` (its first `rows` rows if given), packed."""
    with GGUFFile(path) as gguf_file:
        info = gguf_file.tensors[name]
        k = info.shape[-1]
        raw = gguf_file.tensor_bytes(name).reshape(-1, tensor_nbytes(info.ggml_type, k))
        n = info.shape[0] if rows is None else min(rows, info.shape[0])
        return pack(raw[:n], info.ggml_type, (n, k), device)


def activations(rng: np.random.Generator, m: int, k: int, outlier_every: int = 0) -> np.ndarray:
    """f32 [m, k] unit-normal activations (llama.cpp's test inputs); with outlier_every > 0, one
    channel in outlier_every is 20x larger, as in a transformer's residual stream."""
    x = rng.standard_normal((m, k)).astype(np.float32)
    if outlier_every:
        x[:, rng.choice(k, size=max(1, k // outlier_every), replace=False)] *= 20.0
    return x


def nmse(actual, expected) -> float:
    """Normalized mean squared error sum((a - e)^2) / sum(e^2), llama.cpp's test-backend-ops measure."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.sum((actual - expected) ** 2) / max(np.sum(expected**2), 1e-30))
