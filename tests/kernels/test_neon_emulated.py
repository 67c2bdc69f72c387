"""The NEON kernels (rz_kernels/cpu/*_neon.cc) on an emulated aarch64 CPU, and the run-time choice of variant.

An emulated aarch64 Python (qemu-aarch64-static, prepared by `.ci/aarch64-emulation.sh DIR`, found
through $RZ_AARCH64_EMULATION=DIR) runs tests/kernels/neon_emulated_run.py: rz_kernels.cpu_ffi
detects the emulated CPU's features, builds the variant it selects with the cross compiler and
registers it with jax.ffi, and the kernels run from jax on inputs made here. The references are
computed here, natively. The emulated CPU is switched with $QEMU_CPU:
  - max,sve=off: dotprod and i8mm -> neon_i8mm (vmmlaq_s32 for two or more rows);
  - neoverse-n1: dotprod only, as Apple's M1 -> neon_dotprod;
  - cortex-a72: neither -> no kernels, the XLA paths (and no SIGILL).
Emulated SIMD is 35-80x slower than native: the shapes are small, the checks about correctness.
"""

import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from rz.ggml_types import BLOCK_GEOMETRY, GGMLType
from rz.quants import QTensor, dequantize, qmatmul_ref
from rz_kernels.causal_attention import attention_ref
from rz_kernels.quantized_matmul import CPU_FFI_ARRAYS, activation_block, q8_1_sum_correction, quantize_activations_ref
from rz_kernels.testing import activations, nmse, random_qtensor
from test_kernel_attention import make_inputs

REPO = Path(__file__).resolve().parents[2]
EMULATION = os.environ.get("RZ_AARCH64_EMULATION")
TYPES = sorted(CPU_FFI_ARRAYS)
TOLERANCE = 5e-4  # as the x86 kernel's tests: llama.cpp's test-backend-ops bound against qmatmul_ref
TWIN_NMSE = 1e-8  # against the exact twin (the activations rounded as the kernel rounds them)
# Rows of x per call: decode sizes, a partial i8mm pair (3, 5), whole dotprod tiles (4, 8), beyond.
ROWS = (1, 2, 3, 4, 5, 8, 17)
ALONE = 8  # rows also computed one at a time, which a call of up to 8 rows must reproduce bit for bit

pytestmark = pytest.mark.skipif(
    EMULATION is None,
    reason="no aarch64 emulation: run `bash .ci/aarch64-emulation.sh DIR` and set RZ_AARCH64_EMULATION=DIR (CI does)",
)


def shapes(ggml_type: GGMLType) -> list[tuple[int, int]]:
    """An odd row count that leaves a partial tile of 4 and of 16; one block, several, an odd count."""
    block = BLOCK_GEOMETRY[ggml_type].block_size
    return [(37, block), (6, 17 * 32)] if block == 32 else [(21, block), (6, 3 * block)]


def make_plan() -> tuple[dict, dict[str, np.ndarray], dict[str, tuple]]:
    """Inputs for the emulated run, and per output key its references."""
    rng = np.random.default_rng(18)
    plan = {"qmatmul": [], "attention": []}
    arrays: dict[str, np.ndarray] = {}
    expected: dict[str, tuple] = {}

    def add(key, weights, x):
        plan["qmatmul"].append(
            {"key": key, "types": [int(w.ggml_type) for w in weights], "shapes": [list(w.shape) for w in weights], "rows": ROWS, "alone": ALONE}
        )
        arrays[f"{key}.x"] = x
        for i, w in enumerate(weights):
            for name in CPU_FFI_ARRAYS[w.ggml_type]:
                arrays[f"{key}.w{i}.{name}"] = np.asarray(w.arrays[name])
        expected[key] = tuple(weights)

    for ggml_type in TYPES:
        for n, k in shapes(ggml_type):
            add(f"{ggml_type.name}_{n}x{k}", [random_qtensor(rng, ggml_type, (n, k))], activations(rng, max(ROWS), k))
    # One call for several weights of one x (q/k/v), both activation block sizes at once.
    mixed = [random_qtensor(rng, t, (n, 512)) for t, n in ((GGMLType.Q4_K, 12), (GGMLType.Q6_K, 5), (GGMLType.Q5_1, 7), (GGMLType.Q8_0, 9))]
    add("mixed", mixed, activations(rng, max(ROWS), 512, outlier_every=64))

    # Decode attention (a few query rows): grouped heads, f16 and f32 caches, softcap, window.
    for key, (batch, n_head, n_kv, length, n_keys, head_dim, window, softcap, dtype) in {
        "attention_f32": (2, 4, 1, 1, 90, 32, 0, 0.0, np.float32),
        "attention_f16_softcap_window": (1, 9, 3, 3, 70, 64, 16, 30.0, np.float16),
        "attention_dv24": (1, 6, 2, 2, 40, 24, 0, 0.0, np.float32),
    }.items():
        q, k, v, qp, kp = make_inputs(7, batch, n_head, n_kv, length, n_keys, head_dim)
        options = {"window": window, "scale": head_dim**-0.5, "softcap": softcap}
        arrays.update({f"{key}.q": q, f"{key}.k": k.astype(dtype), f"{key}.v": v.astype(dtype), f"{key}.qp": qp, f"{key}.kp": kp})
        plan["attention"].append({"key": key, "options": options})
        expected[key] = (q, k.astype(dtype), v.astype(dtype), qp, kp, options)
    arrays["plan"] = np.asarray(json.dumps(plan))
    return plan, arrays, expected


@cache
def prepared(tmp: Path):
    plan, arrays, expected = make_plan()
    np.savez(tmp / "inputs.npz", **arrays)
    return plan, arrays, expected


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Inputs on disk, and one kernel cache for the module's emulated runs (each variant built once)."""
    return tmp_path_factory.mktemp("neon")


def run_emulated(workdir: Path, qemu_cpu: str) -> tuple[dict, dict[str, np.ndarray]]:
    """neon_emulated_run.py under QEMU_CPU=qemu_cpu: (its report, its outputs)."""
    prepared(workdir)
    root = Path(EMULATION)
    compiler = shutil.which("aarch64-linux-gnu-g++")
    assert compiler, "the cross compiler aarch64-linux-gnu-g++ is missing (.ci/aarch64-emulation.sh installs it)"
    env = {
        **os.environ,
        "QEMU_LD_PREFIX": str(root / "rootfs"),
        "QEMU_CPU": qemu_cpu,
        "CXX": compiler,
        "PYTHONPATH": str(REPO),
        "RZ_CACHE_DIR": str(workdir / "cache"),
        "JAX_PLATFORMS": "cpu",
    }
    outputs = workdir / f"outputs-{qemu_cpu.replace(',', '_').replace('=', '-')}.npz"
    command = ["qemu-aarch64-static", str(root / "venv" / "bin" / "python"), str(Path(__file__).with_name("neon_emulated_run.py"))]
    result = subprocess.run([*command, str(workdir / "inputs.npz"), str(outputs)], env=env, capture_output=True, text=True, timeout=900)
    # A kernel instruction the emulated CPU lacks ends the process with SIGILL (returncode -4).
    assert result.returncode == 0, f"QEMU_CPU={qemu_cpu}: exit {result.returncode}\n{result.stderr[-4000:]}"
    with np.load(outputs) as loaded:
        out = dict(loaded)
    return json.loads(str(out.pop("report"))), out


@pytest.fixture(scope="module")
def i8mm_run(workdir):
    return run_emulated(workdir, "max,sve=off")


@pytest.fixture(scope="module")
def dotprod_run(workdir):
    return run_emulated(workdir, "neoverse-n1")


def twin_and_reference(x: np.ndarray, weights: tuple[QTensor, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's exact twin (activations rounded as it rounds them, then float64) and qmatmul_ref, side by side."""
    twins, references = [], []
    for qt in weights:
        w = np.asarray(dequantize(qt), np.float64)
        twin = np.asarray(quantize_activations_ref(jnp.asarray(x), activation_block(qt.ggml_type)), np.float64) @ w.T
        correction = q8_1_sum_correction(jnp.asarray(x), qt)
        twins.append(twin if correction is None else twin + np.asarray(correction, np.float64))
        references.append(np.asarray(qmatmul_ref(jnp.asarray(x), qt), np.float64))
    return np.concatenate(twins, axis=1), np.concatenate(references, axis=1)


def check_kernels(workdir: Path, outputs: dict[str, np.ndarray]) -> None:
    plan, arrays, expected = prepared(workdir)
    for case in plan["qmatmul"]:
        key = case["key"]
        x = arrays[f"{key}.x"]
        twin, reference = twin_and_reference(x, expected[key])
        n = twin.shape[1]
        for m in case["rows"]:
            y = outputs[f"{key}.y{m}"]
            assert y.shape == (m, n), (key, m)
            assert nmse(y, twin[:m]) <= TWIN_NMSE, (key, m, nmse(y, twin[:m]))
            if n * m >= 64:
                assert nmse(y, reference[:m]) <= TOLERANCE, (key, m)
        alone = np.concatenate([outputs[f"{key}.alone{i}"] for i in range(case["alone"])])
        for m in case["rows"]:
            if m <= case["alone"]:
                np.testing.assert_array_equal(outputs[f"{key}.y{m}"], alone[:m], err_msg=f"{key}: M={m} against rows alone")
    for case in plan["attention"]:
        q, k, v, qp, kp, options = expected[case["key"]]
        reference = attention_ref(*(jnp.asarray(a) for a in (q, k, v, qp, kp)), **options)
        np.testing.assert_allclose(outputs[f"{case['key']}.o"], reference, atol=1e-5, err_msg=case["key"])


def test_a_cpu_with_i8mm_takes_neon_i8mm(i8mm_run):
    report, _ = i8mm_run
    assert {"asimddp", "i8mm"} <= set(report["features"])
    assert report["selected"] == "neon_i8mm" and report["available"]
    assert "rz_cpu_kernels_neon_i8mm_" in report["library"]


def test_neon_i8mm_kernels_match_references(workdir, i8mm_run):
    check_kernels(workdir, i8mm_run[1])


def test_a_cpu_with_dotprod_only_takes_neon_dotprod(dotprod_run):
    report, _ = dotprod_run
    assert "asimddp" in report["features"] and "i8mm" not in report["features"]
    assert report["selected"] == "neon_dotprod" and report["available"]
    assert "rz_cpu_kernels_neon_dotprod_" in report["library"]


def test_neon_dotprod_kernels_match_references(workdir, dotprod_run):
    check_kernels(workdir, dotprod_run[1])


def test_i8mm_and_dotprod_agree_bit_for_bit(i8mm_run, dotprod_run):
    """Both variants take the same float operations per output (only the integer dots' instructions
    differ), so a model gives the same tokens on an M1 and on a Graviton 3."""
    i8mm, dotprod = i8mm_run[1], dotprod_run[1]
    assert i8mm.keys() == dotprod.keys()
    for key in i8mm:
        if not key.endswith(".o"):
            np.testing.assert_array_equal(i8mm[key], dotprod[key], err_msg=key)


def test_a_cpu_without_dotprod_takes_the_xla_paths(workdir):
    report, outputs = run_emulated(workdir, "cortex-a72")
    assert "asimddp" not in report["features"]
    assert report["selected"] is None and not report["available"]
    plan, arrays, expected = prepared(workdir)
    for case in plan["qmatmul"][:1]:
        key = case["key"]
        reference = np.concatenate([np.asarray(qmatmul_ref(jnp.asarray(arrays[f"{key}.x"]), w)) for w in expected[key]], axis=1)
        for m in case["rows"]:
            np.testing.assert_allclose(outputs[f"{key}.y{m}"], reference[:m], rtol=1e-5, atol=1e-5)
