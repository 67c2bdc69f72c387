"""The experts' quantized matmul of a mixture-of-experts layer (llama.cpp's ggml_mul_mat_id): each
(token, chosen expert) pair's row of x against that expert's matrix W[e] [N, K], a slice of a 3-D
weight [n_expert, N, K].

On x86-64 CPUs the C++ kernel (rz_kernels/cpu/qmatmul_moe.cc) reads the chosen experts' rows in
place, with qmatmul.cc's dot products, tiles and activation rounding: a decode step reads only
the active experts' bytes, and a prompt's pairs are grouped by expert, each expert's rows through
one matmul. Elsewhere (a GPU, aarch64's NEON build, types the kernel lacks, and where the XLA
path's matmuls would not take the C++ kernel: see experts_kernel_serves) the caller takes its
XLA path (rz.models.moe).
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rz_kernels import cpu_ffi
from rz_kernels.quantized_matmul import CPU_FFI_ARRAYS, CPU_FFI_PATHS, activation_block, select_path
from rz_kernels.quants import QTensor, qmatmul_ref


def experts_kernel_serves(weights: Sequence[QTensor], rows: int) -> bool:
    """Whether the C++ experts' kernel runs here and takes these 3-D weights [n_expert, N, K] where
    the dense dispatch (quantized_matmul.select_path) would send a matmul of `rows` rows on one
    expert to the C++ kernel: the caller then gets the rounding of the path it replaces."""
    variant = cpu_ffi.selected()
    if variant is None or not cpu_ffi.has_experts_kernel(variant) or not cpu_ffi.available():
        return False
    return all(
        len(qt.shape) == 3
        and qt.shape[2] % activation_block(qt.ggml_type) == 0
        and select_path("cpu", qt.ggml_type, rows, qt.shape[1:]) in CPU_FFI_PATHS
        for qt in weights
    )


def qmatmul_experts_cpu(
    x: jax.Array, ids: jax.Array, weights: Sequence[QTensor], max_threads: int = 0, variant: cpu_ffi.Variant | None = None
) -> jax.Array:
    """x f32 [M, K] (every pair of a token reads its row) or [M * k, K] (a row per pair), ids int32
    [M, k] (each token's experts) -> f32 [M * k, sum of N]: row m * k + j is x's row for that pair
    against expert ids[m, j] of each weight, their outputs side by side."""
    variant = cpu_ffi.active(variant)
    weights = list(weights)
    pairs, n = ids.shape[0] * ids.shape[1], sum(qt.shape[1] for qt in weights)
    if x.shape[0] not in (ids.shape[0], pairs) or any(len(qt.shape) != 3 or qt.shape[2] != x.shape[1] for qt in weights):
        raise ValueError(f"qmatmul_experts: x {x.shape} and ids {ids.shape} do not fit weights {[qt.shape for qt in weights]}")
    arrays = [qt.arrays[name] for qt in weights for name in CPU_FFI_ARRAYS[qt.ggml_type]]
    call = jax.ffi.ffi_call(cpu_ffi.experts_target(variant), jax.ShapeDtypeStruct((pairs, n), jnp.float32), vmap_method="sequential")
    types = np.asarray([int(qt.ggml_type) for qt in weights], np.int32)
    return call(x.astype(jnp.float32), ids.astype(jnp.int32), *arrays, ggml_types=types, max_threads=np.int32(max_threads))


def expert_matrix(qt: QTensor, e: jax.Array | int) -> QTensor:
    """Expert e's matrix [N, K] of a 3-D weight [n_expert, N, K]: a slice of each array."""
    return QTensor({name: array[e] for name, array in qt.arrays.items()}, qt.ggml_type, qt.shape[1:])


def qmatmul_experts_ref(x: jax.Array, ids: jax.Array, qt: QTensor) -> jax.Array:
    """The reference twin for one weight: each pair's row times its expert's dequantized matrix, f32 [M * k, N]."""
    pairs = ids.reshape(-1)
    rows = x if x.shape[0] == pairs.shape[0] else jnp.repeat(x, ids.shape[1], axis=0)

    def one(row, e):
        return qmatmul_ref(row[None], expert_matrix(qt, e))[0]

    return jax.vmap(one)(rows, pairs)
