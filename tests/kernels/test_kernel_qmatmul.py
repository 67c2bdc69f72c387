"""rz_kernels.qmatmul (rz_kernels/quantized_matmul.py): every path against rz_kernels.quants.qmatmul_ref, NMSE <= 5e-4 (llama.cpp's test-backend-ops bound).

The C++ CPU kernel runs natively; the Pallas GPU kernel runs in interpret mode on CPU, and its
lowering to Triton IR for CUDA is checked without a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rz.errors import RzError
from rz.gguf import GGUFFile
from rz_kernels.ggml_types import BLOCK_GEOMETRY, GGMLType
from rz.model_files import gemma3_270m_path, smollm2_135m_path
from rz_kernels.quants import QTensor, dequantize, qmatmul_ref
from rz_kernels import cpu_ffi, describe_paths, qmatmul, qmatmul_many, qmatmul_pallas, quantized_matmul, select_path
from rz_kernels.build import variant_named
from rz_kernels.quantized_matmul import (
    CPU_FFI_ARRAYS,
    CPU_TILES_MAX_M,
    K_QUANTS,
    PANEL_VARIANTS,
    activation_block,
    qmatmul_cpu,
    qmatmul_xla_cpu,
    q8_1_sum_correction,
    quantize_activations_ref,
)
from support import ggml_oracle
from support.kernels import activations, nmse, random_qtensor, real_qtensor

# Pallas kernels run compiled on a GPU and in interpret mode elsewhere (CI's CPUs).
INTERPRET = jax.default_backend() != "gpu"
# Interpret mode repeats the reference's f32 arithmetic; compiled on a GPU, the dots run on tensor
# cores at XLA's default precision (TF32), measured NMSE ~1e-7 on an H200: llama.cpp's bound holds.
PALLAS_NMSE = 1e-10 if INTERPRET else 5e-4

TOLERANCE = 5e-4
# Prompts of K-quants take the C++ kernel's int8 GEMM on x86 (quantized_matmul's cpu_ffi_prefill).
X86_PREFILL = cpu_ffi.available() and cpu_ffi.selected().machine == "x86_64"
# ... and every type's where the kernel has 512-bit panels (AVX-512 VNNI).
PANEL_PREFILL = X86_PREFILL and cpu_ffi.selected().name in PANEL_VARIANTS
TYPES = sorted(CPU_FFI_ARRAYS)
needs_cpu_kernels = pytest.mark.skipif(not cpu_ffi.available(), reason="the C++ CPU kernels cannot be built here")

# M values that cross the C++ kernel's structure: 1 (decode), partial and whole row groups of 8
# (fused), 16 (decoded rows), 17 (the prefill tiling), 70 (a prefill's panels of 16 rows, the last
# partial); test_cpu_prefill_crosses_tiles_of_x_rows takes a second tile of x rows.
CPU_ROWS = (1, 3, 8, 9, 16, 17, 70)


def cpu_shapes(ggml_type: GGMLType) -> list[tuple[int, int]]:
    """Odd row counts; K of one block, an odd number of blocks, and a count not a multiple of 8;
    for 32-block types also an even count (4-bit types read blocks in pairs with few rows of x)."""
    block = BLOCK_GEOMETRY[ggml_type].block_size
    shapes = [(37, block), (20, 5 * block if block == 32 else 3 * block), (3, 17 * 32 if block == 32 else 256)]
    return shapes + [(21, 6 * 32), (22, 10 * 32)] if block == 32 else shapes


def cpu_and_references(x: np.ndarray, qt: QTensor, w: np.ndarray | None = None, variant=None):
    """The C++ kernel's y (its `variant`, default this CPU's), its exact twin's and qmatmul_ref's,
    the references in float64 NumPy from w = dequantize(qt) (one compilation per weight shape
    instead of one per x shape)."""
    w = np.asarray(dequantize(qt), np.float64) if w is None else w
    twin_x = np.asarray(quantize_activations_ref(jnp.asarray(x), activation_block(qt.ggml_type)), np.float64)
    twin = twin_x @ w.T
    correction = q8_1_sum_correction(jnp.asarray(x), qt)
    if correction is not None:
        twin = twin + np.asarray(correction, np.float64)
    return np.asarray(qmatmul_cpu(jnp.asarray(x), qt, variant=variant)), twin, x.astype(np.float64) @ w.T


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_cpu_kernel_matches_references(ggml_type, cpu_variant):
    """Per block exact against its twin (int8 activations, f32 weights): an indexing slip shows as
    an error of order 1; against qmatmul_ref within the tolerance wherever there are enough
    outputs for an NMSE to mean something."""
    rng = np.random.default_rng(int(ggml_type))
    for n, k in cpu_shapes(ggml_type):
        qt = random_qtensor(rng, ggml_type, (n, k))
        w = np.asarray(dequantize(qt), np.float64)
        for m in CPU_ROWS:
            actual, twin, reference = cpu_and_references(activations(rng, m, k), qt, w, cpu_variant)
            assert nmse(actual, twin) <= 1e-8, (n, k, m)
            if n * m >= 64:
                assert nmse(actual, reference) <= TOLERANCE, (n, k, m)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_cpu_prefill_crosses_tiles_of_x_rows(ggml_type, cpu_variant):
    """A prompt longer than a prefill task's tile of x rows (256 at this K), ending in a partial
    panel of 16 rows, against a weight whose rows end in a partial tile of 8."""
    rng = np.random.default_rng(29)
    qt = random_qtensor(rng, ggml_type, (21, 512))
    actual, twin, reference = cpu_and_references(activations(rng, 260, 512), qt, variant=cpu_variant)
    assert nmse(actual, twin) <= 1e-8
    assert nmse(actual, reference) <= TOLERANCE


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_cpu_kernel_rows_do_not_depend_on_the_batch(ggml_type, cpu_variant):
    """A decode step's row gets bit for bit the same output alone or with up to 7 others (the
    server's greedy output must not depend on what else is in the batch)."""
    rng = np.random.default_rng(17)
    for n, k in cpu_shapes(ggml_type):
        qt = random_qtensor(rng, ggml_type, (n, k))
        x = activations(rng, 8, k)
        alone = np.concatenate([np.asarray(qmatmul_cpu(jnp.asarray(x[i : i + 1]), qt, variant=cpu_variant)) for i in range(8)])
        for m in range(2, 9):
            together = np.asarray(qmatmul_cpu(jnp.asarray(x[:m]), qt, variant=cpu_variant))
            np.testing.assert_array_equal(together, alone[:m], err_msg=f"{n}x{k}, M={m}")


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_cpu_variants_are_bit_for_bit_the_avx2_variant(ggml_type, cpu_variant):
    """The VNNI variants' int8 dots (vpdpbusd, vpdpwssd) give the same int32 sums as AVX2's maddubs
    + madd, which never saturates here, and everything after them is the same code: so the same
    outputs, bit for bit, at every M the kernel serves (decode rows, paired and decoded paths)."""
    if cpu_variant.machine != "x86_64":
        pytest.skip("bit-for-bit equality is promised between the x86-64 variants")
    avx2 = variant_named("avx2")
    rng = np.random.default_rng(23)
    for n, k in cpu_shapes(ggml_type) + [(64, 2048)]:
        qt = random_qtensor(rng, ggml_type, (n, k))
        for m in (1, 2, 5, 8, 9, 16):
            x = jnp.asarray(activations(rng, m, k))
            np.testing.assert_array_equal(
                np.asarray(qmatmul_cpu(x, qt, variant=cpu_variant)), np.asarray(qmatmul_cpu(x, qt, variant=avx2)), err_msg=f"{n}x{k}, M={m}"
            )


@needs_cpu_kernels
@pytest.mark.skipif(not ggml_oracle.available(), reason="llama-cpp-python's ggml is not installed")
@pytest.mark.parametrize(
    "model, name",
    [
        ("smollm2", "token_embd.weight"),  # Q8_0, the LM head
        ("smollm2", "blk.0.ffn_gate.weight"),  # Q4_1
        ("gemma3", "blk.0.attn_q.weight"),  # Q5_0
        ("gemma3", "blk.0.ffn_down.weight"),  # Q6_K
    ],
)
def test_cpu_kernel_against_ggml(model, name, cpu_variant):
    """Against llama.cpp's own ggml_mul_mat on the same GGUF bytes: the activations are quantized
    exactly as ggml quantizes them (Q8_0 / Q8_1 scales in f16, Q8_K's in f32), and the blocks'
    int32 dots are exact, so the outputs differ by the order of the f32 sums only (rz sums blocks
    in pairs, ggml one at a time)."""
    path = {"smollm2": smollm2_135m_path, "gemma3": gemma3_270m_path}[model]()
    qt = real_qtensor(path, name)
    with GGUFFile(path) as f:
        raw = np.array(f.tensor_bytes(name))
    n, k = qt.shape
    rng = np.random.default_rng(3)
    # Decode rows, and a prompt's (qmatmul's cpu_ffi_prefill path) for K-quants and in 512-bit
    # panels (the 32-block types' 256-bit tiles round the weight scales to 14-bit multipliers,
    # 2^-15 of the row's largest).
    for m in (1, 3, 8, 40) if qt.ggml_type in K_QUANTS or cpu_variant.name in PANEL_VARIANTS else (1, 3, 8):
        x = activations(rng, m, k)
        theirs = ggml_oracle.GGMLMatmul(raw, int(qt.ggml_type), n, k, m, 2)(x)
        ours = np.asarray(qmatmul_cpu(jnp.asarray(x), qt, variant=cpu_variant))
        assert np.abs(ours - theirs).max() <= 2e-6 * np.abs(theirs).max(), f"M={m}"


@needs_cpu_kernels
def test_cpu_kernel_with_outlier_channels():
    """A 20x outlier channel coarsens its activation block's int8 grid (as in llama.cpp): the error
    grows with the share of such blocks, here 1 in 8, but stays within 4x the bound."""
    rng = np.random.default_rng(5)
    qt = random_qtensor(rng, GGMLType.Q5_0, (256, 1024))
    actual, _, expected = cpu_and_references(activations(rng, 4, 1024, outlier_every=256), qt)
    assert nmse(actual, expected) <= 4 * TOLERANCE


@needs_cpu_kernels
def test_cpu_kernel_edge_values():
    """Zero rows of W (scale 0), zero rows of x, and x with a single huge value."""
    rng = np.random.default_rng(1)
    qt = random_qtensor(rng, GGMLType.Q4_K, (16, 512))
    zero_row_3 = {name: jnp.asarray(qt.arrays[name]).at[3].set(0) for name in ("d", "dmin")}
    qt = QTensor({**qt.arrays, **zero_row_3}, qt.ggml_type, qt.shape)
    x = activations(rng, 12, 512)
    x[2] = 0
    x[5] = 0
    x[5, 100] = 1e6
    actual, _, expected = cpu_and_references(x, qt)
    np.testing.assert_array_equal(np.asarray(actual)[:, 3], 0)
    np.testing.assert_array_equal(np.asarray(actual)[2], 0)
    assert nmse(actual, expected) <= TOLERANCE


def test_qmatmul_dispatch_shapes_and_paths():
    rng = np.random.default_rng(2)
    qt = random_qtensor(rng, GGMLType.Q8_0, (48, 64))
    x = jnp.asarray(activations(rng, 6, 64)).reshape(2, 3, 64)
    y = jax.jit(qmatmul)(x, qt)
    assert y.shape == (2, 3, 48) and y.dtype == jnp.float32
    assert nmse(y, qmatmul_ref(x, qt)) <= TOLERANCE
    assert qmatmul(jnp.zeros((0, 64)), qt).shape == (0, 48)
    with pytest.raises(ValueError, match="does not contract"):
        qmatmul(jnp.zeros((1, 32)), qt)
    # A type no kernel implements takes the reference.
    f16 = random_qtensor(rng, GGMLType.F16, (8, 64))
    assert select_path("cpu", GGMLType.F16, 1) == "xla_reference"
    np.testing.assert_allclose(qmatmul(x, f16), qmatmul_ref(x, f16), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not cpu_ffi.available(), reason="the C++ CPU kernels cannot be built here")
def test_cpu_prefill_rows_are_exact_and_decode_rows_take_the_kernel(monkeypatch):
    """Without 512-bit panels, beyond CPU_TILES_MAX_M rows a 32-block type's activations are not
    rounded to int8: y is the f32 reference's; a K-quant's take the kernel's int8 prefill GEMM, as
    close as its decode rows, and so do a 32-block type's up to CPU_TILES_MAX_M rows on x86."""
    monkeypatch.setattr(quantized_matmul, "PANEL_VARIANTS", frozenset())
    rng = np.random.default_rng(3)
    qts = [random_qtensor(rng, GGMLType.Q4_1, (64, 256)), random_qtensor(rng, GGMLType.Q6_K, (32, 256))]
    n_rows = CPU_TILES_MAX_M + 8
    x = jnp.asarray(activations(rng, n_rows, 256))
    many = jax.jit(qmatmul_many)
    exact, prefill = many(x, qts)
    np.testing.assert_allclose(exact, qmatmul_ref(x, qts[0]), rtol=1e-5, atol=1e-5)
    short = x[:40]
    if X86_PREFILL:
        assert select_path("cpu", GGMLType.Q4_1, 40, qts[0].shape) == "cpu_ffi_prefill"
        np.testing.assert_array_equal(many(short, qts)[0], qmatmul_cpu(short, qts[0]))
        assert nmse(many(short, qts)[0], qmatmul_ref(short, qts[0])) <= TOLERANCE
    else:
        np.testing.assert_allclose(many(short, qts)[0], qmatmul_ref(short, qts[0]), rtol=1e-5, atol=1e-5)
    if X86_PREFILL:
        assert select_path("cpu", GGMLType.Q6_K, n_rows, qts[1].shape) == "cpu_ffi_prefill"
        np.testing.assert_array_equal(prefill, qmatmul_cpu(x, qts[1]))
        assert nmse(prefill, qmatmul_ref(x, qts[1])) <= TOLERANCE
    else:
        np.testing.assert_allclose(prefill, qmatmul_ref(x, qts[1]), rtol=1e-5, atol=1e-5)
    # Few rows: the kernel's int8 activations, close to the reference but not equal to it.
    for y, qt in zip(many(x[:16], qts), qts):
        assert nmse(y, qmatmul_ref(x[:16], qt)) <= TOLERANCE
        assert not np.allclose(y, qmatmul_ref(x[:16], qt), rtol=1e-5, atol=1e-5)
    # A weight too large to copy to f32 whole is dequantized a tile of rows at a time, exact too:
    # 64 rows of 256 in tiles of 24 rows, so two whole tiles and a remainder of 16.
    monkeypatch.setattr(quantized_matmul, "CPU_F32_MAX_BYTES", 4 * 64 * 256 - 1)
    monkeypatch.setattr(quantized_matmul, "CPU_F32_TILE_BYTES", 4 * 24 * 256)
    assert select_path("cpu", GGMLType.Q4_1, n_rows, qts[0].shape) == "xla_f32_tiled"
    y = jax.jit(qmatmul)(x, qts[0])
    np.testing.assert_allclose(y, qmatmul_ref(x, qts[0]), rtol=1e-5, atol=1e-5)
    # ... and stays on the kernel for a decode step.
    assert select_path("cpu", GGMLType.Q4_1, 16, qts[0].shape) == "cpu_ffi"


@pytest.mark.skipif(not cpu_ffi.available(), reason="the C++ CPU kernels cannot be built here")
def test_cpu_large_weight_is_never_whole_in_f32(monkeypatch):
    """A weight over CPU_F32_MAX_BYTES in f32 (an LM head) costs one tile's copy beyond its output
    (where a 32-block type's prompt takes XLA: without 512-bit panels)."""
    monkeypatch.setattr(quantized_matmul, "PANEL_VARIANTS", frozenset())
    monkeypatch.setattr(quantized_matmul, "CPU_F32_MAX_BYTES", 1 << 20)
    monkeypatch.setattr(quantized_matmul, "CPU_F32_TILE_BYTES", 1 << 18)
    rng = np.random.default_rng(9)
    qt = random_qtensor(rng, GGMLType.Q8_0, (2048, 512))  # 4 MiB in f32, tiles of 128 rows
    n_rows = CPU_TILES_MAX_M + 8  # a prompt chunk that takes XLA
    x = jnp.asarray(activations(rng, n_rows, 512))
    compiled = jax.jit(qmatmul).lower(x, qt).compile()
    output = 4 * n_rows * 2048
    assert compiled.memory_analysis().temp_size_in_bytes <= output + 3 * (1 << 18)
    np.testing.assert_allclose(compiled(x, qt), qmatmul_ref(x, qt), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", ["xla_f32", "xla_f32_tiled", "xla_reference"])
def test_xla_cpu_paths_give_a_slice_of_rows_the_whole_weights_bits(path, monkeypatch):
    """A tensor-parallel shard holds a slice of a weight's rows (of any width, at any offset): XLA's
    paths give its columns one device's bits, which its GEMM alone does not for every width."""
    monkeypatch.setattr(quantized_matmul, "CPU_F32_TILE_BYTES", 1 << 18)  # xla_f32_tiled: tiles of 128 rows
    rng = np.random.default_rng(12)
    qt = random_qtensor(rng, GGMLType.Q8_0, (640, 512))
    x = jnp.asarray(activations(rng, 56, 512))
    product = jax.jit(qmatmul_xla_cpu, static_argnums=2)
    whole = np.asarray(product(x, qt, path))
    for start, width in ((0, 16), (16, 16), (40, 40), (160, 160), (320, 320)):
        rows = QTensor({name: a[start : start + width] for name, a in qt.arrays.items()}, qt.ggml_type, (width, 512))
        np.testing.assert_array_equal(product(x, rows, path), whole[:, start : start + width], err_msg=f"rows {start}+{width}")


@pytest.mark.skipif(not cpu_ffi.available(), reason="the C++ CPU kernels cannot be built here")
def test_cpu_prefill_makes_each_f32_weight_where_it_is_used(monkeypatch):
    """A chain of prefill matmuls holds one dequantized weight at a time, not all of them: XLA's
    scheduler would otherwise dequantize every layer's weight up front (the step's temporaries
    grew by the whole model in f32). Without 512-bit panels, where 32-block prompts take XLA."""
    monkeypatch.setattr(quantized_matmul, "PANEL_VARIANTS", frozenset())
    rng = np.random.default_rng(5)
    weights = [random_qtensor(rng, GGMLType.Q4_1, (512, 512)) for _ in range(12)]
    x = jnp.asarray(activations(rng, CPU_TILES_MAX_M + 8, 512))

    def chain(x, weights):
        for qt in weights:
            x = jnp.tanh(qmatmul(x, qt))
        return x

    compiled = jax.jit(chain).lower(x, weights).compile()
    one_weight_f32 = 4 * 512 * 512
    assert compiled.memory_analysis().temp_size_in_bytes <= 3 * one_weight_f32
    np.testing.assert_allclose(compiled(x, weights), chain(x, weights), rtol=1e-5, atol=1e-5)


def test_describe_paths():
    cpu = [row for row in describe_paths("cpu") if row["op"] == "qmatmul"]
    assert cpu[-1]["path"] == "xla_reference"
    if cpu_ffi.available():
        assert cpu[0]["path"] == "cpu_ffi" and "Q5_0" in cpu[0]["types"]
        assert select_path("cpu", GGMLType.Q6_K, 16) == "cpu_ffi"
        # A prompt's rows: K-quants take the x86 kernel's int8 GEMM, the 32-block types too with
        # 512-bit panels, and up to CPU_TILES_MAX_M rows in 256-bit tiles; else (and every type on
        # aarch64) XLA's f32 GEMM on the dequantized weight, unless that copy is large.
        prefill = "cpu_ffi_prefill" if X86_PREFILL else "xla_f32"
        assert select_path("cpu", GGMLType.Q6_K, 17) == prefill
        assert select_path("cpu", GGMLType.Q6_K, 512, (2048, 640)) == prefill
        assert select_path("cpu", GGMLType.Q8_0, 17) == prefill
        assert select_path("cpu", GGMLType.Q8_0, CPU_TILES_MAX_M, (2048, 640)) == prefill
        long_prompt = "cpu_ffi_prefill" if PANEL_PREFILL else "xla_f32"
        assert select_path("cpu", GGMLType.Q8_0, CPU_TILES_MAX_M + 1, (2048, 640)) == long_prompt
        assert select_path("cpu", GGMLType.Q8_0, 512, (2048, 640)) == long_prompt
        assert select_path("cpu", GGMLType.Q8_0, 512, (262144, 640)) == ("cpu_ffi_prefill" if PANEL_PREFILL else "xla_f32_tiled")
        # Every type's prompt rows are described, by the first row that holds them.
        for qtype in TYPES:
            for m in (17, CPU_TILES_MAX_M, CPU_TILES_MAX_M + 1, 512):
                rows = [row for row in cpu if qtype.name in row["types"] and row["m_min"] <= m <= (row["m_max"] or m)]
                assert rows and rows[0]["path"] == select_path("cpu", qtype, m, (2048, 640))
        # ... and each row's first M is served by that row (no row claims rows an earlier one takes).
        for row in cpu[:-1]:
            shape = (262144, 640) if row["path"] == "xla_f32_tiled" else (2048, 640)
            for name in row["types"]:
                assert select_path("cpu", GGMLType[name], row["m_min"], shape) == row["path"], (row, name)
    assert {row["op"] for row in describe_paths("cpu")} == {"qmatmul", "attention", "kv_cache_write"}
    cuda = {row["path"]: row for row in describe_paths("cuda")}
    assert cuda["pallas_prefill"]["m_min"] == 17
    # Decode on a GPU takes XLA unless RZ_PALLAS_DECODE=1 (measured faster end to end on an H200).
    assert select_path("cuda", GGMLType.Q4_1, 1) == "xla_reference"
    assert select_path("cuda", GGMLType.Q4_1, 17) == "pallas_prefill"
    assert select_path("cuda", GGMLType.Q4_1, 64) == "pallas_prefill"


# ---------------------------------------------------------------------------------------------
# Pallas, interpret mode: small shapes, a decode and a prefill configuration per type.


def pallas_shape(ggml_type: GGMLType) -> tuple[int, int]:
    return (32, 512) if BLOCK_GEOMETRY[ggml_type].block_size == 256 else (32, 256)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_pallas_kernel_matches_reference(ggml_type):
    rng = np.random.default_rng(10 + int(ggml_type))
    n, k = pallas_shape(ggml_type)
    qt = random_qtensor(rng, ggml_type, (n, k))
    block_k = max(BLOCK_GEOMETRY[ggml_type].block_size, 128)
    # decode: M padded to 16, two K splits; prefill: two M tiles, a loop over K.
    for m, blocks in ((3, {"block_n": 16, "block_k": block_k, "split_k": 2}), (20, {"block_m": 16, "block_n": 32})):
        x = jnp.asarray(activations(rng, m, k))
        actual = qmatmul_pallas.qmatmul(x, qt, interpret=INTERPRET, **blocks)
        assert nmse(actual, qmatmul_ref(x, qt)) <= PALLAS_NMSE, (m, blocks)


@pytest.mark.parametrize("block_n, block_k, split_k", [(16, 32, 1), (32, 64, 4), (64, 256, 1), (16, 128, 2)])
def test_pallas_kernel_block_sizes(block_n, block_k, split_k):
    rng = np.random.default_rng(20)
    qt = random_qtensor(rng, GGMLType.Q5_0, (64, 512))
    x = jnp.asarray(activations(rng, 5, 512))
    actual = qmatmul_pallas.qmatmul(x, qt, block_n=block_n, block_k=block_k, split_k=split_k, interpret=INTERPRET)
    assert nmse(actual, qmatmul_ref(x, qt)) <= PALLAS_NMSE


def test_pallas_kernel_rejects_blocks_that_do_not_tile():
    qt = random_qtensor(np.random.default_rng(0), GGMLType.Q4_K, (48, 512))
    with pytest.raises(ValueError, match="do not tile"):
        qmatmul_pallas.qmatmul(jnp.zeros((1, 512)), qt, block_k=128, interpret=INTERPRET)
    assert not qmatmul_pallas.tiles(40, 512, GGMLType.Q4_K)


@pytest.mark.parametrize("ggml_type", TYPES, ids=lambda t: t.name)
def test_pallas_kernel_lowers_to_triton(ggml_type):
    """Pallas-to-Triton lowering (what fails on unsupported ops) runs without a GPU."""
    n, k = pallas_shape(ggml_type)
    qt = jax.eval_shape(lambda: random_qtensor(np.random.default_rng(0), ggml_type, (n, k)))
    for m in (1, 64):
        lowered = jax.jit(qmatmul_pallas.qmatmul).trace(jax.ShapeDtypeStruct((m, k), jnp.float32), qt)
        text = lowered.lower(lowering_platforms=("cuda",)).as_text()
        assert "xla.gpu.triton" in text


# ---------------------------------------------------------------------------------------------
# Real tensors of both models (the first rows of each).

REAL_TENSORS = [
    (gemma3_270m_path, "blk.0.attn_q.weight"),  # Q5_0
    (gemma3_270m_path, "blk.0.attn_v.weight"),  # Q8_0
    (gemma3_270m_path, "blk.0.attn_output.weight"),  # Q4_K
    (gemma3_270m_path, "blk.0.ffn_down.weight"),  # Q6_K
    (gemma3_270m_path, "token_embd.weight"),  # Q8_0, the LM head
    (smollm2_135m_path, "blk.0.ffn_up.weight"),  # Q4_1
    (smollm2_135m_path, "blk.0.ffn_down.weight"),  # Q4_1
    (smollm2_135m_path, "token_embd.weight"),  # Q8_0, the LM head
]


def load_real(model_path, name, rows):
    try:
        return real_qtensor(model_path(), name, rows=rows)
    except RzError as error:
        pytest.skip(str(error))


@needs_cpu_kernels
@pytest.mark.parametrize("model_path, name", REAL_TENSORS, ids=lambda v: getattr(v, "__name__", v))
def test_cpu_kernel_on_real_tensors(model_path, name):
    qt = load_real(model_path, name, rows=1024)
    rng = np.random.default_rng(3)
    w = np.asarray(dequantize(qt), np.float64)
    for m in (1, 8, 40):
        actual, _, expected = cpu_and_references(activations(rng, m, qt.shape[1]), qt, w)
        assert nmse(actual, expected) <= TOLERANCE, m


@pytest.mark.parametrize(
    "model_path, name",
    REAL_TENSORS[:1] + REAL_TENSORS[3:4] + REAL_TENSORS[5:6],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_pallas_kernel_on_real_tensors(model_path, name):
    qt = load_real(model_path, name, rows=64)
    x = jnp.asarray(activations(np.random.default_rng(4), 2, qt.shape[1]))
    assert nmse(qmatmul_pallas.qmatmul(x, qt, interpret=INTERPRET), qmatmul_ref(x, qt)) <= PALLAS_NMSE


@pytest.mark.parametrize("m", [1, 5, 40])
def test_several_weights_in_one_call(m, cpu_variant):
    """q/k/v-style weights of mixed types (32-block and K-quant, so two activation roundings) through
    one call: each output equals that weight's own call."""
    rng = np.random.default_rng(31)
    weights = [
        random_qtensor(rng, GGMLType.Q5_0, (48, 512)),
        random_qtensor(rng, GGMLType.Q4_K, (16, 512)),
        random_qtensor(rng, GGMLType.Q8_0, (24, 512)),
        random_qtensor(rng, GGMLType.Q4_1, (20, 512)),  # pairs of blocks, from the same quantized x
    ]
    x = jnp.asarray(activations(rng, m, 512))
    together = np.split(np.asarray(qmatmul_cpu(x, weights, variant=cpu_variant)), np.cumsum([qt.shape[0] for qt in weights])[:-1], axis=1)
    for qt, y in zip(weights, together):
        assert y.shape == (m, qt.shape[0])
        np.testing.assert_array_equal(np.asarray(y), np.asarray(qmatmul_cpu(x, qt, variant=cpu_variant)))
        assert nmse(y, qmatmul_ref(x, qt)) <= 5e-4
