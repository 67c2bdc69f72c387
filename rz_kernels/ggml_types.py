"""GGML tensor types and their block geometry, as numbered in the GGUF format."""

import enum
from dataclasses import dataclass


class GGMLType(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35


@dataclass(frozen=True)
class BlockGeometry:
    """How many weights one block holds and how many bytes it takes."""

    block_size: int
    type_size: int


QK_K = 256

BLOCK_GEOMETRY: dict[GGMLType, BlockGeometry] = {
    GGMLType.F32: BlockGeometry(1, 4),
    GGMLType.F16: BlockGeometry(1, 2),
    GGMLType.BF16: BlockGeometry(1, 2),
    GGMLType.F64: BlockGeometry(1, 8),
    GGMLType.I8: BlockGeometry(1, 1),
    GGMLType.I16: BlockGeometry(1, 2),
    GGMLType.I32: BlockGeometry(1, 4),
    GGMLType.I64: BlockGeometry(1, 8),
    GGMLType.Q4_0: BlockGeometry(32, 2 + 16),
    GGMLType.Q4_1: BlockGeometry(32, 2 + 2 + 16),
    GGMLType.Q5_0: BlockGeometry(32, 2 + 4 + 16),
    GGMLType.Q5_1: BlockGeometry(32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: BlockGeometry(32, 2 + 32),
    GGMLType.Q8_1: BlockGeometry(32, 4 + 4 + 32),
    GGMLType.Q2_K: BlockGeometry(QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),
    GGMLType.Q3_K: BlockGeometry(QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    GGMLType.Q4_K: BlockGeometry(QK_K, 2 + 2 + QK_K // 2 + 12),
    GGMLType.Q5_K: BlockGeometry(QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    GGMLType.Q6_K: BlockGeometry(QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    GGMLType.Q8_K: BlockGeometry(QK_K, 4 + QK_K + QK_K // 8),
    GGMLType.IQ2_XXS: BlockGeometry(QK_K, 2 + QK_K // 4),
    GGMLType.IQ2_XS: BlockGeometry(QK_K, 2 + QK_K // 4 + QK_K // 32),
    GGMLType.IQ3_XXS: BlockGeometry(QK_K, 2 + QK_K // 4 + QK_K // 8),
    GGMLType.IQ1_S: BlockGeometry(QK_K, 2 + QK_K // 8 + QK_K // 16),
    GGMLType.IQ4_NL: BlockGeometry(32, 2 + 16),
    GGMLType.IQ3_S: BlockGeometry(QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    GGMLType.IQ2_S: BlockGeometry(QK_K, 2 + QK_K // 4 + QK_K // 16),
    GGMLType.IQ4_XS: BlockGeometry(QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    GGMLType.IQ1_M: BlockGeometry(QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    GGMLType.TQ1_0: BlockGeometry(QK_K, 2 + 4 * 13),
    GGMLType.TQ2_0: BlockGeometry(QK_K, 2 + 64),
}


def tensor_nbytes(ggml_type: GGMLType, n_elements: int) -> int:
    """Bytes taken by n_elements of ggml_type; n_elements must be a whole number of blocks."""
    geometry = BLOCK_GEOMETRY[ggml_type]
    return n_elements // geometry.block_size * geometry.type_size
