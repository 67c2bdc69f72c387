"""Quantized matmul y = x @ W.T for a QTensor W [N, K]: one entry point, one path per backend and shape.

Paths (see `describe_paths()`; the reference twin is `rz_kernels.quants.qmatmul_ref`):

    backend  types                      M (= batch x tokens)  path
    cpu      Q4_0 Q4_1 Q5_0 Q5_1 Q8_0   1-16                  cpu_ffi: C++ kernel (AVX2/VNNI) through XLA's FFI
             Q4_K Q5_K Q6_K
    cpu      Q4_K Q5_K Q6_K             > 16                  cpu_ffi_prefill (x86): the same kernel's register-
             (and the 32-block types                          tiled int8 GEMM (panels of 16 rows with
             with AVX-512 VNNI)                               512-bit vpdpbusd on AVX-512 VNNI)
    cpu      Q4_0 Q4_1 Q5_0 Q5_1 Q8_0   17-64 (x86)           cpu_ffi_prefill: the register-tiled int8 GEMM
    cpu      Q4_0 Q4_1 Q5_0 Q5_1 Q8_0   > 64 (> 16 off x86)   xla_f32: dequantize, then XLA's f32 GEMM
             (without AVX-512 VNNI)                           (weights up to 64 MiB in f32; larger
                                                              ones, LM heads, xla_f32_tiled: 32 MiB
                                                              of rows dequantized at a time)
    cuda     the same                   1-16                  xla_reference (pallas_decode with RZ_PALLAS_DECODE=1)
             the same                   > 16                  pallas_prefill: tiled Pallas kernel
    any      anything else              all                   xla_reference: dequantize, then an f32 dot

Why a C++ kernel on CPU: XLA:CPU has no fast form for decode. Dequantizing to f32 and then a
dot is many times slower than streaming the quantized weights; dots with int8/f16/bf16 operands
take a slow path at batch 1, 4-bit unpacking inside a jitted function is slow, and per-block
scales rule out XLA's int8 dot. The kernel quantizes the activations to int8 as llama.cpp does
(per 32 for 32-block weights, per 256 for K-quants) and meets every weight block in one maddubs,
so it streams the weights once at decode, at about llama.cpp's own speed.

Beyond 16 rows (a prompt's prefill, scoring) K-quants take the kernel's int8 GEMM: activations
quantized once per call to Q8_K as llama.cpp does, so a prompt's matmuls round as llama.cpp's do;
register tiles of weight rows x activation rows, each load serving several int8 dots (with
AVX-512 VNNI, 16 activation rows in a vector's lanes against a weight row's bytes broadcast). It beats
XLA's f32 GEMM on the dequantized weight (benchmarks/kernels/bench_prefill.py). The 32-block
types take it too where the kernel has 512-bit panels (PANEL_VARIANTS): a block's 16 rows x 8
weight rows of dots cost a convert, a multiply and an FMA per vector, and beat XLA's f32 GEMM.
In the 256-bit tiles that overhead falls on every 32 products of one row pair, which did not
beat XLA at a long prompt's chunks, so beyond CPU_TILES_MAX_M rows they keep XLA's f32 GEMM, whose
f32 activations are exact (rz's logits closer to a float64 forward pass than llama.cpp's). Up to
that many rows (a chat turn's tail, a short prompt's chunk) dequantizing the whole weight on every
call costs XLA more than the tiles lose, so the int8 GEMM takes those too. A weight over 64 MiB in
f32 (an LM head) is dequantized and multiplied 32 MiB of rows at a time (xla_f32_tiled), so a long
prompt's logits are exact too. Where the kernel cannot be
built (no compiler, no AVX2) the CPU takes xla_reference, logged once.

qmatmul_by_layer takes one layer's weights of many, the layer's index known at run time, so that a
model's layers can run in one scan: one compiled layer body instead of one per layer (a compiled
step's memory grows with its instructions). On CPU the kernel picks that layer's arrays from all
layers' in one call (nothing sliced or copied); elsewhere it is a switch with a branch per layer.

Why XLA for decode on a GPU: a decode step of these small models is bound by kernel launches,
not bandwidth, and XLA fuses the dequantization into fewer of them, so decode takes XLA and
prefill Pallas; RZ_PALLAS_DECODE=1 brings the split-K decode kernel back (its tests run either way).

The measurements behind each choice: benchmarks/results/design-measurements.md.
"""

import functools
import logging
import os
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rz_kernels.ggml_types import GGMLType
from rz_kernels.quants import QTensor, QTensorStack, qmatmul_ref
from rz_kernels import cpu_ffi

log = logging.getLogger("rz_kernels")

# The order in which the C++ kernel reads each type's arrays (rz_kernels/cpu/qmatmul.cc, QMatmulImpl).
CPU_FFI_ARRAYS: dict[GGMLType, tuple[str, ...]] = {
    GGMLType.Q4_0: ("d", "qs"),
    GGMLType.Q4_1: ("d", "m", "qs"),
    GGMLType.Q5_0: ("d", "qh", "qs"),
    GGMLType.Q5_1: ("d", "m", "qh", "qs"),
    GGMLType.Q8_0: ("d", "qs"),
    GGMLType.Q4_K: ("d", "dmin", "scales", "mins", "qs"),
    GGMLType.Q5_K: ("d", "dmin", "scales", "mins", "qh", "qs"),
    GGMLType.Q6_K: ("qs", "qh", "scales", "d"),
}

# Up to this many rows of x a GPU matmul is a decode step: memory-bound, W streamed once.
GPU_DECODE_MAX_M = 16
# Up to this many rows of x a CPU matmul takes the C++ kernel's decode path; beyond, its int8
# prefill GEMM (cpu_ffi_prefill) or XLA's f32 GEMM on the dequantized weight (see the module docstring).
CPU_KERNEL_MAX_M = 16
# Up to this many rows of x the 32-block types take the int8 GEMM in 256-bit tiles too (cpu_ffi_prefill):
# beyond, XLA's f32 GEMM on the dequantized weight is as fast or faster (see the module docstring).
CPU_TILES_MAX_M = 64
# The kernel variants whose prompts meet in 512-bit panels (qmatmul.cc's kPanels), where every
# type's int8 GEMM beats XLA's f32 GEMM; the others' 256-bit tiles beat it for K-quants, and for the
# 32-block types only up to CPU_TILES_MAX_M rows.
PANEL_VARIANTS = frozenset({"avx512vnni"})
# The CPU paths that call the C++ kernel (one call may then take several weights).
CPU_FFI_PATHS = frozenset({"cpu_ffi", "cpu_ffi_prefill"})
# A weight larger than this in f32 is not dequantized whole beyond CPU_KERNEL_MAX_M rows (its copy
# would be a transient of that size), but CPU_F32_TILE_BYTES of rows at a time.
CPU_F32_MAX_BYTES = 64 << 20
CPU_F32_TILE_BYTES = 32 << 20
# XLA:CPU's f32 GEMM gives each output column the same bits whatever the weight's width and the
# column's place, so long as the width is a whole number of 64-column panels; any other width
# rounds every column differently (measured, jax 0.10.2). A tensor-parallel shard holds a slice of
# a weight's rows, so XLA's paths pad a weight to whole panels, and a shard's columns then equal
# one device's. The GEMM is jaxlib's precompiled code, the same on every x86 CPU it runs on.
CPU_F32_PANEL_ROWS = 64


@dataclass(frozen=True)
class Path:
    """One implementation of qmatmul, for a backend, a set of types and a range of M."""

    backend: str
    name: str
    types: tuple[str, ...]
    m_min: int
    m_max: int | None  # None: unbounded
    max_f32_bytes: int | None = None  # weights larger than this in f32 go elsewhere
    note: str = ""  # what else decides it, for describe_paths

    def serves(self, backend: str, ggml_type: GGMLType, m: int, shape: tuple[int, ...] | None = None) -> bool:
        in_range = self.m_min <= m and (self.m_max is None or m <= self.m_max)
        fits = self.max_f32_bytes is None or shape is None or 4 * int(np.prod(shape)) <= self.max_f32_bytes
        return backend == self.backend and ggml_type.name in self.types and in_range and fits


def pallas_enabled() -> bool:
    """RZ_PALLAS=0 sends GPU work to the XLA reference paths (to compare, or to work around a
    Pallas/Triton version that cannot compile a kernel)."""
    return os.environ.get("RZ_PALLAS", "1") != "0"


@functools.cache
def cuda_present() -> bool:
    """Whether this process has a CUDA backend. jax.lax.platform_dependent traces every branch it is
    given, so the CUDA branches (which import Pallas) are passed only where they can run."""
    try:
        return bool(jax.devices("cuda"))
    except RuntimeError:
        return False


def pallas_decode_enabled() -> bool:
    """RZ_PALLAS_DECODE=1: decode steps on a GPU take the Pallas kernels (see the module docstring)."""
    return pallas_enabled() and os.environ.get("RZ_PALLAS_DECODE", "0") == "1"


def _paths(backend: str) -> tuple[Path, ...]:
    """A backend's paths, in the order select_path tries them."""
    if backend == "cuda":
        gpu_types = tuple(t.name for t in sorted(_pallas().SUPPORTED_TYPES)) if pallas_enabled() else ()
        decode_types = gpu_types if pallas_decode_enabled() else ()
        return (
            Path("cuda", "pallas_decode", decode_types, 1, GPU_DECODE_MAX_M),
            Path("cuda", "pallas_prefill", gpu_types, GPU_DECODE_MAX_M + 1, None),
        )
    if backend != "cpu":
        return ()
    cpu_types = tuple(t.name for t in CPU_FFI_ARRAYS) if cpu_ffi.available() else ()
    # The register-tiled int8 GEMM is the x86 kernels' (qmatmul.cc); the NEON kernels' many-row path
    # is not tiled and was not measured against XLA, so aarch64 prompts keep XLA's f32 GEMM.
    x86 = bool(cpu_types) and cpu_ffi.selected().machine == "x86_64"
    panels = x86 and cpu_ffi.selected().name in PANEL_VARIANTS
    prefill_types = (cpu_types if panels else tuple(t.name for t in sorted(K_QUANTS))) if x86 else ()
    xla_types = tuple(t for t in cpu_types if t not in prefill_types)
    tiled_types = xla_types if x86 else ()
    # On x86 the register tiles take the XLA types' prompts up to CPU_TILES_MAX_M rows first.
    xla_m_min = (CPU_TILES_MAX_M if x86 else CPU_KERNEL_MAX_M) + 1
    return (
        Path("cpu", "cpu_ffi", cpu_types, 1, CPU_KERNEL_MAX_M, note=f"variant {cpu_ffi.selected().name}" if cpu_types else ""),
        Path("cpu", "cpu_ffi_prefill", prefill_types, CPU_KERNEL_MAX_M + 1, None,
             note="int8 GEMM in " + ("512-bit panels of 16 rows" if panels else "register tiles")),
        Path("cpu", "cpu_ffi_prefill", tiled_types, CPU_KERNEL_MAX_M + 1, CPU_TILES_MAX_M, note="int8 GEMM in register tiles"),
        Path("cpu", "xla_f32", xla_types, xla_m_min, None, CPU_F32_MAX_BYTES, f"weights up to {CPU_F32_MAX_BYTES >> 20} MiB in f32"),
        Path("cpu", "xla_f32_tiled", xla_types, xla_m_min, None,
             note=f"weights over {CPU_F32_MAX_BYTES >> 20} MiB in f32, {CPU_F32_TILE_BYTES >> 20} MiB of rows at a time"),
    )


def select_path(backend: str, ggml_type: GGMLType, m: int, shape: tuple[int, ...] | None = None) -> str:
    """The name of the path qmatmul takes for a weight type (and shape [N, K], where known) and M
    rows of x on a backend. Without a shape, the path of a weight of ordinary size."""
    for path in _paths(backend):
        if path.serves(backend, ggml_type, m, shape):
            return path.name
    return "xla_reference"


def describe_paths(backend: str | None = None) -> list[dict]:
    """Which implementation serves which (types, M range) on `backend` (default: jax's default backend).

    The last row is the fallback for every other type.
    """
    backend = backend or jax.default_backend()
    rows = [
        {"op": "qmatmul", "backend": p.backend, "path": p.name, "types": p.types, "m_min": p.m_min, "m_max": p.m_max}
        | ({"max_f32_bytes": p.max_f32_bytes} if p.max_f32_bytes is not None else {})
        | ({"note": p.note} if p.note else {})
        for p in _paths(backend)
        if p.types
    ]
    rows.append(
        {"op": "qmatmul", "backend": backend, "path": "xla_reference", "types": ("*",), "m_min": 1, "m_max": None}
    )
    return rows


_logged: set[tuple] = set()


def _log_first_use(ggml_type: GGMLType, n: int, k: int, m: int) -> None:
    key = (ggml_type, n, k, m)
    if key not in _logged and log.isEnabledFor(logging.INFO):  # the cuda row imports Pallas
        _logged.add(key)
        paths = ", ".join(f"{b}: {select_path(b, ggml_type, m, (n, k))}" for b in ("cpu", "cuda"))
        log.info("rz_kernels.qmatmul %s [%d x %d] at M=%d -> %s", ggml_type.name, n, k, m, paths)


def qmatmul_cpu(x: jax.Array, qt: QTensor | Sequence[QTensor], max_threads: int = 0, variant: cpu_ffi.Variant | None = None) -> jax.Array:
    """The C++ kernel: x f32 [M, K] @ W[N, K].T -> f32 [M, N], for types in CPU_FFI_ARRAYS.

    Given several weights, one call computes x against each and returns their outputs side by
    side, [M, sum of N]: q/k/v or gate/up share the call's fixed costs (quantizing x, handing
    rows to threads), which at decode are as large as a small matmul's work.
    max_threads caps the threads it takes (0: all; benchmarks compare 1 and 2); variant picks a
    build of the kernel (default: the one this CPU runs, cpu_ffi.selected()).
    """
    variant = cpu_ffi.active(variant)
    weights = [qt] if isinstance(qt, QTensor) else list(qt)
    m, n = x.shape[0], sum(w.shape[0] for w in weights)
    arrays, types = _kernel_operands(weights)
    call = jax.ffi.ffi_call(cpu_ffi.qmatmul_target(variant), jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(x.astype(jnp.float32), *arrays, ggml_types=types, max_threads=np.int32(max_threads))


def qmatmul_layer_cpu(
    x: jax.Array, layer: jax.Array, weights_by_layer: Sequence[Sequence[QTensor]], max_threads: int = 0, variant: cpu_ffi.Variant | None = None
) -> jax.Array:
    """The C++ kernel on layer `layer`'s weights, the index an int32 scalar known at run time:
    x f32 [M, K] -> f32 [M, sum of a layer's N], qmatmul_cpu(x, weights_by_layer[layer]) bit for bit.
    Every layer's arrays are operands of the one call and the kernel reads only that layer's, so no
    weight is sliced or copied (as indexing stacked weights in XLA would)."""
    variant = cpu_ffi.active(variant)
    m, n = x.shape[0], sum(w.shape[0] for w in weights_by_layer[0])
    arrays, types = _kernel_operands([w for weights in weights_by_layer for w in weights])
    call = jax.ffi.ffi_call(cpu_ffi.qmatmul_layer_target(variant), jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(
        x.astype(jnp.float32), jnp.asarray(layer, jnp.int32), *arrays,
        ggml_types=types, weights_per_layer=np.int32(len(weights_by_layer[0])), max_threads=np.int32(max_threads),
    )


def _kernel_operands(weights: Sequence[QTensor]) -> tuple[list[jax.Array], np.ndarray]:
    """The C++ kernel's operands for weights in turn: their arrays in CPU_FFI_ARRAYS order, and their types."""
    arrays = [w.arrays[name] for w in weights for name in CPU_FFI_ARRAYS[w.ggml_type]]
    return arrays, np.asarray([int(w.ggml_type) for w in weights], np.int32)


def _side_by_side(y: jax.Array, weights: Sequence[QTensor]) -> tuple[jax.Array, ...]:
    """The outputs of one kernel call on several weights, [M, sum of N], split into each weight's [M, N]."""
    return tuple(jnp.split(y, np.cumsum([qt.shape[0] for qt in weights])[:-1], axis=1))


# The C++ kernel quantizes activations per 32 elements for 32-block weights (llama.cpp's Q8_0) and
# per 256 for K-quants (Q8_K), whose integer sub-block scales then add up in int32.
K_QUANTS = frozenset({GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K})


def activation_block(ggml_type: GGMLType) -> int:
    """Elements per activation scale in the C++ kernel's int8 activations for this weight type."""
    return 256 if ggml_type in K_QUANTS else 32


def _activation_blocks(x: jax.Array, block: int):
    """x [..., K] as the C++ kernel quantizes it: (int8 values [..., K/block, block] as f32, the
    scale before rounding, the scale stored). A 32-element scale is stored in f16, as llama.cpp's
    block_q8_0 stores it; a 256-element one (Q8_K) in f32."""
    blocks = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, block)
    max_abs = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True)
    inverse = jnp.where(max_abs > 0, 127.0 / max_abs, 0.0)
    scale = max_abs / 127.0
    stored = scale.astype(jnp.float16).astype(jnp.float32) if block == 32 else scale
    return jnp.round(blocks * inverse), scale, stored


@functools.partial(jax.jit, static_argnames="block")
def quantize_activations_ref(x: jax.Array, block: int = 32) -> jax.Array:
    """x [..., K] rounded as the C++ kernel quantizes it: int8 per `block` elements, scale amax/127
    (stored in f16 for 32-element blocks). Returns the dequantized values, f32 [..., K]."""
    q, _, stored = _activation_blocks(x, block)
    return (q * stored).reshape(x.shape)


# Weight types that meet llama.cpp's Q8_1 activations, whose block sum s = f16(d * sum(q)) is
# taken with the scale before its rounding: their offsets (mins) meet that s, not d16 * sum(q).
_Q8_1_TYPES = frozenset({GGMLType.Q4_1, GGMLType.Q5_1})


def q8_1_sum_correction(x: jax.Array, qt: QTensor) -> jax.Array | None:
    """For Q4_1 and Q5_1, what the C++ kernel's y has beyond qmatmul_ref on quantize_activations_ref's
    x: the difference of Q8_1's block sums from the dequantized ones, met by the weight's mins.
    None for the other types."""
    if qt.ggml_type not in _Q8_1_TYPES:
        return None
    return _sum_correction(x, qt.arrays["m"].reshape(qt.shape[0], -1))


@jax.jit
def _sum_correction(x: jax.Array, mins: jax.Array) -> jax.Array:
    q, scale, stored = _activation_blocks(x, 32)
    total = jnp.sum(q, axis=-1)
    s = (scale[..., 0] * total).astype(jnp.float16).astype(jnp.float32)
    return jnp.einsum("...b,nb->...n", s - stored[..., 0] * total, mins.astype(jnp.float32))


def qmatmul_f32_after(x: jax.Array, qt: QTensor) -> jax.Array:
    """qmatmul_ref, its dequantization held back until x exists.

    The weights are inputs of the step, and XLA:CPU's default scheduler runs independent work
    early: it dequantized every layer's weights at the start and kept all the f32 copies alive
    (SmolLM2's pp512 temporaries 44 -> 447 MiB, peak RSS 526 -> 951 MiB). An optimization
    barrier does not survive XLA:CPU's passes, so the weight's scales take a data dependency on
    x instead: + (x[0, 0] > inf), which is 0 for every x (NaN included) and which XLA does not
    fold. Each copy is then made where it is used and freed after it (temporaries 49 MiB).
    """
    never = (x[0, 0] > jnp.inf).astype(qt.arrays["d"].dtype)
    arrays = dict(qt.arrays, d=qt.arrays["d"] + never)
    return qmatmul_ref(x, QTensor(arrays, qt.ggml_type, qt.shape))


def qmatmul_f32_tiled(x: jax.Array, qt: QTensor) -> jax.Array:
    """qmatmul_ref with the weight dequantized CPU_F32_TILE_BYTES of rows at a time, in a loop
    that writes each tile's columns of y in place: a large weight (an LM head) is never whole in
    f32. Each tile depends on the loop index, so XLA cannot hoist the dequantization out of it."""
    n, k = qt.shape
    rows = max(1, CPU_F32_TILE_BYTES // (4 * k * CPU_F32_PANEL_ROWS)) * CPU_F32_PANEL_ROWS
    n_tiles = n // rows
    if n_tiles <= 1:
        return qmatmul_f32_after(x, qt)
    for name, array in qt.arrays.items():
        if array.shape[0] != n:
            raise ValueError(f"qmatmul_f32_tiled: array {name} {array.shape} is not laid out by weight row (N = {n})")

    def rows_of(start, count):
        arrays = {name: jax.lax.dynamic_slice_in_dim(a, start, count, axis=0) for name, a in qt.arrays.items()}
        return QTensor(arrays, qt.ggml_type, (count, k))

    def tile(i, y):
        start = i * rows
        return jax.lax.dynamic_update_slice_in_dim(y, qmatmul_ref(x, rows_of(start, rows)), start, axis=1)

    y = jax.lax.fori_loop(0, n_tiles, tile, jnp.zeros((x.shape[0], n), jnp.float32))
    if n % rows:
        start = n_tiles * rows
        y = jax.lax.dynamic_update_slice_in_dim(y, qmatmul_ref(x, rows_of(start, n - start)), start, axis=1)
    return y


def whole_panels(qt: QTensor) -> QTensor:
    """qt with zero rows appended up to a multiple of CPU_F32_PANEL_ROWS (itself if it has one)."""
    n, k = qt.shape
    pad = -n % CPU_F32_PANEL_ROWS
    if not pad:
        return qt
    arrays = {name: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for name, a in qt.arrays.items()}
    return QTensor(arrays, qt.ggml_type, (n + pad, k))


def qmatmul_xla_cpu(x: jax.Array, qt: QTensor, path: str) -> jax.Array:
    """x f32 [M, K] @ W.T by one of XLA's CPU paths (xla_f32, xla_f32_tiled, xla_reference), the
    weight padded to whole GEMM panels so that each column's bits do not depend on W's width."""
    xla = {"xla_f32": qmatmul_f32_after, "xla_f32_tiled": qmatmul_f32_tiled, "xla_reference": qmatmul_ref}[path]
    return xla(x, whole_panels(qt))[:, : qt.shape[0]]


def _cpu(x: jax.Array, qt: QTensor) -> jax.Array:
    path = select_path("cpu", qt.ggml_type, x.shape[0], qt.shape)
    return qmatmul_cpu(x, qt) if path in CPU_FFI_PATHS else qmatmul_xla_cpu(x, qt, path)


def _pallas():
    """rz_kernels.qmatmul_pallas, imported where a GPU path needs it: Pallas and its Triton and
    Mosaic lowerings cost every CPU process their import time and resident memory
    (benchmarks/results/memory-session31.md)."""
    from rz_kernels import qmatmul_pallas

    return qmatmul_pallas


def _cuda(x: jax.Array, qt: QTensor) -> jax.Array:
    if select_path("cuda", qt.ggml_type, x.shape[0]) == "xla_reference" or not _pallas().tiles(*qt.shape, qt.ggml_type):
        return qmatmul_ref(x, qt)
    return _pallas().qmatmul(x, qt)


def qmatmul(x: jax.Array, qt: QTensor) -> jax.Array:
    """x [..., K] @ W.T for a quantized W [N, K] -> f32 [..., N], by the fastest path for the backend and M."""
    return qmatmul_many(x, (qt,))[0]


def qmatmul_many(x: jax.Array, weights: Sequence[QTensor]) -> list[jax.Array]:
    """[x @ W.T for W in weights], each f32 [..., N_W]: projections of one input (q/k/v, gate/up).

    On CPU, weights the C++ kernel takes go through one call together; elsewhere (and for other
    types) each takes its own path.
    """
    weights = tuple(weights)
    for qt in weights:
        if len(qt.shape) != 2 or x.shape[-1] != qt.shape[1]:
            raise ValueError(f"qmatmul: x {x.shape} does not contract with a weight of shape {qt.shape}")
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = rows.shape[0]
    if m == 0:
        return [jnp.zeros((*lead, qt.shape[0]), jnp.float32) for qt in weights]
    for qt in weights:
        _log_first_use(qt.ggml_type, *qt.shape, m)

    def cpu(rows, *weights):
        if _in_one_call((weights,), m):
            return _side_by_side(qmatmul_cpu(rows, weights), weights)
        return tuple(_cpu(rows, qt) for qt in weights)

    def cuda(rows, *weights):
        return tuple(_cuda(rows, qt) for qt in weights)

    def reference(rows, *weights):
        return tuple(qmatmul_ref(rows, qt) for qt in weights)

    outputs = jax.lax.platform_dependent(rows, *weights, cpu=cpu, default=reference, **({"cuda": cuda} if cuda_present() else {}))
    return [y.reshape(*lead, qt.shape[0]) for y, qt in zip(outputs, weights)]


def _in_one_call(weights_by_layer: Sequence[Sequence[QTensor]], m: int) -> bool:
    """Whether the C++ kernel takes every weight at M = m rows (so one call can take them all)."""
    return all(select_path("cpu", qt.ggml_type, m, qt.shape) in CPU_FFI_PATHS for weights in weights_by_layer for qt in weights)


def by_layer_in_one_call(weights_by_layer: Sequence[Sequence[QTensor]], m: int) -> bool:
    """Whether qmatmul_by_layer at M = m rows is one C++ kernel call on this process's default
    backend; where it is not, it compiles a branch per layer, and scanning the layers saves nothing."""
    return jax.default_backend() == "cpu" and _in_one_call(weights_by_layer, m)


def _check_layers(x: jax.Array, weights_by_layer: Sequence[Sequence[QTensor]]) -> tuple[tuple[QTensor, ...], ...]:
    """weights_by_layer as tuples, checked: layers of the same number of weights, the j-th weight of
    every layer of one shape [N_j, K] (types may differ), K that of x."""
    by_layer = tuple(tuple(weights) for weights in weights_by_layer)
    if not by_layer or not by_layer[0]:
        raise ValueError("qmatmul_by_layer: weights_by_layer needs at least one layer of at least one weight")
    first = by_layer[0]
    for qt in first:
        if len(qt.shape) != 2 or x.shape[-1] != qt.shape[1]:
            raise ValueError(f"qmatmul_by_layer: x {x.shape} does not contract with a weight of shape {qt.shape}")
    for layer, weights in enumerate(by_layer):
        shapes = [qt.shape for qt in weights]
        if shapes != [qt.shape for qt in first]:
            raise ValueError(
                f"qmatmul_by_layer: layer {layer}'s weights have shapes {shapes}, layer 0's {[qt.shape for qt in first]}: "
                "every layer must have the same number of weights, of the same shapes"
            )
    return by_layer


def _layer_matmuls(index: int, rows: jax.Array, by_layer: tuple[tuple[QTensor, ...], ...]) -> tuple[jax.Array, ...]:
    return tuple(qmatmul_many(rows, by_layer[index]))


def qmatmul_stacked_cpu(
    x: jax.Array, layer: jax.Array, stacks: Sequence[QTensorStack], max_threads: int = 0, variant: cpu_ffi.Variant | None = None
) -> jax.Array:
    """qmatmul_layer_cpu on weights stacked per layer: x f32 [M, K] -> f32 [M, sum of N], layer
    `layer`'s slice of each stack read in place, bit for bit qmatmul_cpu(x, that layer's weights).
    The call's operands are one array per stack and name, however many layers there are."""
    variant = cpu_ffi.active(variant)
    m, n = x.shape[0], sum(s.shape[0] for s in stacks)
    arrays, types = _kernel_operands(stacks)
    call = jax.ffi.ffi_call(cpu_ffi.qmatmul_layer_target(variant), jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(
        x.astype(jnp.float32), jnp.asarray(layer, jnp.int32), *arrays,
        ggml_types=types, weights_per_layer=np.int32(len(stacks)), max_threads=np.int32(max_threads),
    )


def qmatmul_stacked(x: jax.Array, layer: jax.Array, stacks: Sequence[QTensorStack]) -> list[jax.Array]:
    """qmatmul_by_layer for weights stacked per layer (rz_kernels.quants.QTensorStack, all of as
    many layers): each f32 [..., N_j] of layer `layer`'s weights. Where by_layer_in_one_call, one
    C++ kernel call reads the layer's slices in place; elsewhere a lax.switch over the layers."""
    stacks = tuple(stacks)
    if not stacks or any(s.n_layers != stacks[0].n_layers or s.shape[-1] != x.shape[-1] for s in stacks):
        raise ValueError("qmatmul_stacked: needs stacks of as many layers, each [L, N, K] with the K of x")
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = rows.shape[0]
    if m == 0:
        return [jnp.zeros((*lead, s.shape[0]), jnp.float32) for s in stacks]

    def switch(rows, layer, stacks):
        def one(index, rows, stacks):
            return tuple(qmatmul_many(rows, [s.layer(index) for s in stacks]))

        return jax.lax.switch(layer, [functools.partial(one, index) for index in range(stacks[0].n_layers)], rows, stacks)

    def cpu(rows, layer, stacks):
        if _in_one_call([stacks], m):
            return _side_by_side(qmatmul_stacked_cpu(rows, layer, stacks), stacks)
        return switch(rows, layer, stacks)

    layer = jnp.asarray(layer, jnp.int32)
    outputs = jax.lax.platform_dependent(rows, layer, stacks, cpu=cpu, default=switch)
    return [y.reshape(*lead, s.shape[0]) for y, s in zip(outputs, stacks)]


def qmatmul_by_layer(x: jax.Array, layer: jax.Array, weights_by_layer: Sequence[Sequence[QTensor]]) -> list[jax.Array]:
    """qmatmul_many(x, weights_by_layer[layer]) for an int32 scalar layer known at run time (a scan's
    index over a model's layers): each f32 [..., N_j]. Every layer has the same number of weights, the
    j-th of one shape [N_j, K] in every layer; their types may differ.

    Where by_layer_in_one_call, one C++ kernel call picks the layer's arrays, so a scan compiles one
    layer body; elsewhere a lax.switch over the layers, as exact but with every layer's matmuls
    compiled. The kernel rejects a layer out of range (an error at run time); the switch clamps it.
    """
    by_layer = _check_layers(x, weights_by_layer)
    layer = jnp.asarray(layer, jnp.int32)
    if layer.shape != ():
        raise ValueError(f"qmatmul_by_layer: the layer must be a scalar, got shape {layer.shape}")
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = rows.shape[0]
    if m == 0:
        return [jnp.zeros((*lead, qt.shape[0]), jnp.float32) for qt in by_layer[0]]

    def switch(rows, layer, by_layer):
        branches = [functools.partial(_layer_matmuls, index) for index in range(len(by_layer))]
        return jax.lax.switch(layer, branches, rows, by_layer)

    def cpu(rows, layer, by_layer):
        if _in_one_call(by_layer, m):
            return _side_by_side(qmatmul_layer_cpu(rows, layer, by_layer), by_layer[0])
        return switch(rows, layer, by_layer)

    outputs = jax.lax.platform_dependent(rows, layer, by_layer, cpu=cpu, default=switch)
    return [y.reshape(*lead, qt.shape[0]) for y, qt in zip(outputs, by_layer[0])]
