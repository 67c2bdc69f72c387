"""Quantized matmul as a Pallas kernel for GPUs (Triton backend): dequantization fused into the tile loop.

One kernel, two configurations:
  - decode (M <= 16): x padded to 16 rows; the grid runs over tiles of N and splits of K
    (split-K), so even a narrow weight (N = 640) gives the GPU enough programs; each weight
    byte is read once, and the partial sums of the splits are added by XLA afterwards.
  - prefill (M > 16): a classic tiled matmul, grid over (M tiles, N tiles), a loop over K.
Each program loads a [block_n, block_k] tile of every array of the QTensor (one per kind of
data: quants, scales, ...), dequantizes it with `rz_kernels.quants.dequantize` (the same code as the
reference, on a tile-shaped QTensor) and accumulates x_tile @ w_tile.T in f32.

The reference twin is `rz_kernels.quants.qmatmul_ref`; `interpret=True` runs the kernel on any backend
(the CPU tests do). Block sizes are powers of two, as Triton wants; K tiles are whole blocks
(super-blocks for K-quants).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from rz_kernels.ggml_types import BLOCK_GEOMETRY, GGMLType
from rz_kernels.quants import QTensor, dequantize

SUPPORTED_TYPES = frozenset(
    {
        GGMLType.Q4_0,
        GGMLType.Q4_1,
        GGMLType.Q5_0,
        GGMLType.Q5_1,
        GGMLType.Q8_0,
        GGMLType.Q4_K,
        GGMLType.Q5_K,
        GGMLType.Q6_K,
    }
)

DECODE_ROWS = 16  # x rows of a decode tile: tl.dot's minimum
TARGET_PROGRAMS = 256  # about two waves of programs on a 132-SM H100: what split-K aims for


def tiles(n: int, k: int, ggml_type: GGMLType) -> bool:
    """Whether the default blocks tile a weight [n, k] of ggml_type: a supported type and 16 | n.

    K always tiles: a QTensor's K is a multiple of its block, itself a power of two.
    """
    return ggml_type in SUPPORTED_TYPES and n % 16 == 0


def _largest_power_of_two_dividing(n: int, at_most: int) -> int:
    p = 1
    while p * 2 <= at_most and n % (p * 2) == 0:
        p *= 2
    return p


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "split_k", "interpret"))
def qmatmul(
    x: jax.Array,
    qt: QTensor,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    block_k: int | None = None,
    split_k: int | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x f32 [M, K] @ W[N, K].T -> f32 [M, N] for a QTensor W of a SUPPORTED_TYPES type.

    Unset block sizes are chosen for the shape: decode (M <= 16) or prefill tiles.
    """
    if qt.ggml_type not in SUPPORTED_TYPES:
        raise ValueError(f"qmatmul_pallas does not support {qt.ggml_type.name}")
    (m, k), n = x.shape, qt.shape[0]
    geometry = BLOCK_GEOMETRY[qt.ggml_type]
    decode = m <= DECODE_ROWS
    block_m = block_m or (DECODE_ROWS if decode else 64)
    block_n = block_n or _largest_power_of_two_dividing(n, 128 if decode else 64)
    block_k = block_k or max(geometry.block_size, _largest_power_of_two_dividing(k, 256))
    if n % block_n or k % block_k or block_k % geometry.block_size or block_n < 16:
        raise ValueError(
            f"qmatmul_pallas: blocks ({block_n}, {block_k}) do not tile W {qt.shape} of {qt.ggml_type.name}"
        )
    k_tiles = k // block_k
    if split_k is None:
        split_k = 1
        if decode:
            while (
                split_k * 2 <= k_tiles and k_tiles % (split_k * 2) == 0 and (n // block_n) * split_k < TARGET_PROGRAMS
            ):
                split_k *= 2
    if k_tiles % split_k:
        raise ValueError(f"qmatmul_pallas: split_k={split_k} does not divide the {k_tiles} K tiles")

    m_padded = pl.cdiv(m, block_m) * block_m
    x = jnp.pad(x.astype(jnp.float32), ((0, m_padded - m), (0, 0)))
    names = tuple(sorted(qt.arrays))
    # Items of each array per element of K: a K tile of block_k elements is block_k * ratio items.
    ratios = {name: qt.arrays[name].shape[1] / k for name in names}
    split_width = k // split_k
    in_specs = [pl.BlockSpec((block_m, split_width), lambda i, j, s: (i, s))]
    for name in names:
        width = int(split_width * ratios[name])
        in_specs.append(pl.BlockSpec((block_n, width), lambda i, j, s: (j, s)))
    kernel = functools.partial(
        _kernel,
        names=names,
        ratios=ratios,
        ggml_type=qt.ggml_type,
        block_k=block_k,
        steps=k_tiles // split_k,
    )
    partial_sums = pl.pallas_call(
        kernel,
        grid=(m_padded // block_m, n // block_n, split_k),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_m, block_n), lambda i, j, s: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((split_k, m_padded, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name=f"qmatmul_{qt.ggml_type.name.lower()}",
    )(x, *(qt.arrays[name] for name in names))
    return partial_sums.sum(axis=0)[:m]


def _kernel(x_ref, *refs, names, ratios, ggml_type, block_k, steps):
    """One (M tile, N tile, K split): acc = sum over K tiles of x_tile @ dequantize(w_tile).T."""
    *w_refs, out_ref = refs
    block_m, block_n = out_ref.shape

    def step(t, acc):
        x_tile = x_ref[:, pl.ds(t * block_k, block_k)]
        arrays = {}
        for name, ref in zip(names, w_refs):
            width = int(block_k * ratios[name])
            arrays[name] = ref[:, pl.ds(t * width, width)]
        w_tile = dequantize(QTensor(arrays, ggml_type, (block_n, block_k)))
        return acc + jax.lax.dot_general(x_tile, w_tile, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    out_ref[...] = jax.lax.fori_loop(0, steps, step, jnp.zeros((block_m, block_n), jnp.float32))
