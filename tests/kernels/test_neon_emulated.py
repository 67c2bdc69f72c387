"""The NEON kernels (rz_kernels/cpu/*_neon.cc) on an emulated aarch64 CPU, and the run-time choice of variant.

The aarch64 variants are cross-compiled here first (rz_kernels.build with aarch64-linux-gnu-g++, into
a temporary directory). An emulated aarch64 Python (qemu-aarch64-static, prepared by
`.ci/aarch64-emulation.sh DIR`, found through $RZ_AARCH64_EMULATION=DIR) then runs
tests/kernels/neon_emulated_run.py with RZ_CPU_KERNEL_DIR naming that directory: rz_kernels.cpu_ffi
detects the emulated CPU's features, loads the variant it selects and registers it with jax.ffi, and
the kernels run from jax on inputs made here. The references are
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
from functools import cache
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rz_kernels.ggml_types import BLOCK_GEOMETRY, GGMLType
from rz_kernels.quants import QTensor, dequantize, qmatmul_ref
from rz_kernels import attention_kv, build, cpu_ffi
from rz_kernels.causal_attention import attention_ref
from rz_kernels.quantized_matmul import CPU_FFI_ARRAYS, activation_block, q8_1_sum_correction, quantize_activations_ref
from support.kernels import activations, nmse, random_qtensor
from test_kernel_attention import make_inputs, make_paged

REPO = Path(__file__).resolve().parents[2]
EMULATION = os.environ.get("RZ_AARCH64_EMULATION")
TYPES = sorted(CPU_FFI_ARRAYS)
TOLERANCE = 5e-4  # as the x86 kernel's tests: llama.cpp's test-backend-ops bound against qmatmul_ref
TWIN_NMSE = 1e-8  # against the exact twin (the activations rounded as the kernel rounds them)
# Rows of x per call: decode sizes, a partial i8mm pair (3, 5), whole dotprod tiles (4, 8), beyond.
ROWS = (1, 2, 3, 4, 5, 8, 17)
ALONE = 8  # rows also computed one at a time, which a call of up to 8 rows must reproduce bit for bit

needs_emulation = pytest.mark.skipif(
    EMULATION is None,
    reason="no aarch64 emulation: run `bash .ci/aarch64-emulation.sh DIR` and set RZ_AARCH64_EMULATION=DIR (CI does)",
)
# The emulated CPUs: QEMU_CPU for each.
CPUS = {"i8mm": "max,sve=off", "dotprod": "neoverse-n1", "neither": "cortex-a72"}


def shapes(ggml_type: GGMLType) -> list[tuple[int, int]]:
    """An odd row count that leaves a partial tile of 4 and of 16; one block, several, an odd count."""
    block = BLOCK_GEOMETRY[ggml_type].block_size
    return [(37, block), (6, 17 * 32)] if block == 32 else [(21, block), (6, 3 * block)]


def draw_operands(rng, batch: int = 48, vocab: int = 500, frame: int = 16) -> tuple:
    """rz_kernels.sample_draw.draw_cpu's operands: rows of mixed settings over random logits."""
    from test_sample_draw import random_rows

    from rz.sampling import SamplingTensors, _top_k

    params = SamplingTensors.from_params(random_rows(rng, batch))
    penalized = jnp.asarray(rng.normal(size=(batch, vocab)) * rng.choice([0.5, 2.0, 6.0], size=(batch, 1)), jnp.float32)
    frame_logits, frame_ids = _top_k(penalized, frame)
    full_lse = jax.nn.logsumexp(penalized, axis=-1)
    uniforms = jnp.asarray(rng.random(batch), jnp.float32)
    return penalized, frame_logits, frame_ids, full_lse, params.temperature, params.top_k, params.top_p, params.min_p, uniforms


def make_plan() -> tuple[dict, dict[str, np.ndarray], dict[str, tuple]]:
    """Inputs for the emulated run, and per output key its references."""
    rng = np.random.default_rng(18)
    plan = {"qmatmul": [], "attention": []}
    arrays: dict[str, np.ndarray] = {}
    expected: dict[str, tuple] = {}

    def add(key, weights, x, tolerance=TOLERANCE):
        plan["qmatmul"].append(
            {
                "key": key,
                "types": [int(w.ggml_type) for w in weights],
                "shapes": [list(w.shape) for w in weights],
                "rows": ROWS,
                "alone": ALONE,
                "tolerance": tolerance,
            }
        )
        arrays[f"{key}.x"] = x
        for i, w in enumerate(weights):
            for name in CPU_FFI_ARRAYS[w.ggml_type]:
                arrays[f"{key}.w{i}.{name}"] = np.asarray(w.arrays[name])
        expected[key] = tuple(weights)

    for ggml_type in TYPES:
        for n, k in shapes(ggml_type):
            add(f"{ggml_type.name}_{n}x{k}", [random_qtensor(rng, ggml_type, (n, k))], activations(rng, max(ROWS), k))
    # Weights of 64-80 KiB: their rows are shared out to two threads (rz's workers, emulated).
    for ggml_type, n, k in ((GGMLType.Q8_0, 128, 512), (GGMLType.Q6_K, 96, 1024)):
        add(f"{ggml_type.name}_{n}x{k}_threads", [random_qtensor(rng, ggml_type, (n, k))], activations(rng, max(ROWS), k))
    # One call for several weights of one x (q/k/v), both activation block sizes at once.
    mixed = [random_qtensor(rng, t, (n, 512)) for t, n in ((GGMLType.Q4_K, 12), (GGMLType.Q6_K, 5), (GGMLType.Q5_1, 7), (GGMLType.Q8_0, 9))]
    # Its x has 20x outlier channels, which coarsen their blocks' int8 grid: x86's bound for them, 4x.
    add("mixed", mixed, activations(rng, max(ROWS), 512, outlier_every=64), tolerance=4 * TOLERANCE)
    # A second layer of mixed's shapes, its types swapped around: the emulated run calls the layer-indexed
    # kernel (RzQMatmulLayer) on [mixed, mixed_layer] with mixed's x, for each layer.
    mixed_layer = [random_qtensor(rng, t, (n, 512)) for t, n in ((GGMLType.Q6_K, 12), (GGMLType.Q4_0, 5), (GGMLType.Q4_K, 7), (GGMLType.Q5_1, 9))]
    add("mixed_layer", mixed_layer, activations(rng, max(ROWS), 512))
    plan["layers"] = {"cases": ["mixed", "mixed_layer"], "rows": [1, 5, 17]}

    # Decode attention (a few query rows): grouped heads, every cache type (K and V stored by the
    # emulated run from the f32 arrays, as here), softcap, window, a long cache. Then the prompt
    # kernel (more than 16 query rows, the one source compiled for NEON as for x86).
    for key, (batch, n_head, n_kv, length, n_keys, head_dim, window, softcap, types) in {
        "attention_f32": (2, 4, 1, 1, 90, 32, 0, 0.0, ("f32", "f32")),
        "attention_f16_softcap_window": (1, 9, 3, 3, 70, 64, 16, 30.0, ("f16", "f16")),
        "attention_dv24": (1, 6, 2, 2, 40, 24, 0, 0.0, ("f32", "f32")),
        "attention_split": (1, 2, 1, 1, 2100, 32, 0, 0.0, ("f16", "f16")),  # over 2048 slots: split over threads, merged
        "attention_q8_0_bf16": (1, 9, 3, 3, 70, 64, 16, 30.0, ("q8_0", "bf16")),
        "attention_bf16_q8_0": (2, 4, 1, 1, 90, 32, 0, 0.0, ("bf16", "q8_0")),
        "attention_prompt_f16": (1, 6, 2, 20, 60, 32, 0, 0.0, ("f16", "f16")),
        "attention_prompt_q8_0_bf16_softcap_window": (1, 4, 1, 24, 70, 64, 16, 30.0, ("q8_0", "bf16")),
    }.items():
        q, k, v, qp, kp = make_inputs(7, batch, n_head, n_kv, length, n_keys, head_dim)
        options = {"window": window, "scale": head_dim**-0.5, "softcap": softcap}
        arrays.update({f"{key}.q": q, f"{key}.k": k, f"{key}.v": v, f"{key}.qp": qp, f"{key}.kp": kp})
        plan["attention"].append({"key": key, "options": options, "types": types})
        expected[key] = (q, attention_kv.store(jnp.asarray(k), types[0]), attention_kv.store(jnp.asarray(v), types[1]), qp, kp, options, None)
    # Both kernels on a paged pool through a block table (shuffled and shared blocks, absent
    # entries): the emulated run also computes the slab paged_as_slab gathers, which must give the same bits.
    for key, (batch, n_head, n_kv, length, n_table, block_size, head_dim, window, softcap, types) in {
        "attention_paged_f16": (2, 6, 2, 1, 5, 16, 32, 0, 0.0, ("f16", "f16")),
        "attention_paged_prompt_q8_0_bf16_window": (1, 4, 1, 20, 3, 32, 64, 24, 30.0, ("q8_0", "bf16")),
    }.items():
        q, k, v, qp, kp, table, _ = make_paged(7, batch, n_head, n_kv, length, n_table, block_size, head_dim)
        options = {"window": window, "scale": head_dim**-0.5, "softcap": softcap}
        arrays.update({f"{key}.q": q, f"{key}.k": k, f"{key}.v": v, f"{key}.qp": qp, f"{key}.kp": kp, f"{key}.table": table})
        plan["attention"].append({"key": key, "options": options, "types": types})
        expected[key] = (q, attention_kv.store(jnp.asarray(k), types[0]), attention_kv.store(jnp.asarray(v), types[1]), qp, kp, options, table)
    # The sampler's draw (sample_draw.cc) on a 16-candidate frame: its cut, and both redo paths.
    for i, operand in enumerate(draw_operands(rng)):
        arrays[f"draw.{i}"] = np.asarray(operand)
    arrays["plan"] = np.asarray(json.dumps(plan))
    return plan, arrays, expected


@cache
def prepared(tmp: Path):
    plan, arrays, expected = make_plan()
    np.savez(tmp / "inputs.npz", **arrays)
    return plan, arrays, expected


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Inputs on disk, the cross-compiled libraries (lib/), and the emulated runs' outputs."""
    return tmp_path_factory.mktemp("neon")


@pytest.fixture(scope="module")
def runs(workdir) -> dict[str, tuple[dict, dict[str, np.ndarray]]]:
    """neon_emulated_run.py on each of CPUS, side by side (each is mostly one core's emulation):
    per CPU, (its report, its outputs)."""
    prepared(workdir)
    root = Path(EMULATION)
    compiler = shutil.which("aarch64-linux-gnu-g++")
    assert compiler, "the cross compiler aarch64-linux-gnu-g++ is missing (.ci/aarch64-emulation.sh installs it)"
    build.build_all(build.variants_for("aarch64"), cxx=compiler, output_dir=workdir / "lib")
    command = ["qemu-aarch64-static", str(root / "venv" / "bin" / "python"), str(Path(__file__).with_name("neon_emulated_run.py"))]
    started = {}
    for name, qemu_cpu in CPUS.items():
        env = {
            **{key: value for key, value in os.environ.items() if key != "RZ_CPU_VARIANT"},
            "QEMU_LD_PREFIX": str(root / "rootfs"),
            "QEMU_CPU": qemu_cpu,
            "PYTHONPATH": str(REPO),
            "RZ_CPU_KERNEL_DIR": str(workdir / "lib"),
            "JAX_PLATFORMS": "cpu",
            "RZ_CPU_KERNELS": "1",
        }
        outputs = workdir / f"outputs-{name}.npz"
        process = subprocess.Popen([*command, str(workdir / "inputs.npz"), str(outputs)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started[name] = (process, outputs)
    logs = {name: process.communicate(timeout=1200)[0] for name, (process, _) in started.items()}
    results = {}
    for name, (process, outputs) in started.items():
        # A kernel instruction the emulated CPU lacks ends the process with SIGILL (returncode -4).
        assert process.returncode == 0, f"QEMU_CPU={CPUS[name]}: exit {process.returncode}\n{logs[name][-4000:]}"
        with np.load(outputs) as loaded:
            out = dict(loaded)
        results[name] = (json.loads(str(out.pop("report"))), out)
    return results


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
                assert nmse(y, reference[:m]) <= case["tolerance"], (key, m)
        if f"{key}.public" in outputs:  # rz_kernels.qmatmul took the kernel
            np.testing.assert_array_equal(outputs[f"{key}.public"], outputs[f"{key}.y4"], err_msg=f"{key}: qmatmul")
        alone = np.concatenate([outputs[f"{key}.alone{i}"] for i in range(case["alone"])])
        for m in case["rows"]:
            if m <= case["alone"]:
                np.testing.assert_array_equal(outputs[f"{key}.y{m}"], alone[:m], err_msg=f"{key}: M={m} against rows alone")
    for layer in range(len(plan["layers"]["cases"])):  # the layer-indexed kernel: the layer's own call, bit for bit
        for m in plan["layers"]["rows"]:
            np.testing.assert_array_equal(outputs[f"layers.{layer}.y{m}"], outputs[f"layers.{layer}.own{m}"], err_msg=f"layer {layer}, M={m}")
    assert "layer 2 is outside the 2 layers" in str(outputs["layers.out_of_range"])
    for layer in range(2):  # the same kernel on weights stacked per layer (a layer and its rows reversed)
        for m in plan["layers"]["rows"]:
            np.testing.assert_array_equal(outputs[f"stacked.{layer}.y{m}"], outputs[f"stacked.{layer}.own{m}"], err_msg=f"stacked layer {layer}, M={m}")
    for case in plan["attention"]:
        q, k, v, qp, kp, options, table = expected[case["key"]]
        table = None if table is None else jnp.asarray(table)
        reference = attention_ref(jnp.asarray(q), k, v, jnp.asarray(qp), jnp.asarray(kp), block_table=table, **options)
        np.testing.assert_allclose(outputs[f"{case['key']}.o"], reference, atol=1e-5, err_msg=case["key"])
        if table is not None:
            np.testing.assert_array_equal(outputs[f"{case['key']}.o"], outputs[f"{case['key']}.slab"], err_msg=f"{case['key']}: pool against slab")
        np.testing.assert_array_equal(outputs[f"{case['key']}.public"], outputs[f"{case['key']}.o"], err_msg=f"{case['key']}: attention")
    from rz.sampling import _draw_xla

    operands = [jnp.asarray(arrays[f"draw.{i}"]) for i in range(9)]
    expected_tokens = np.asarray(jax.jit(_draw_xla)(*operands))
    sampling = np.asarray(operands[4]) > 0
    # The draw's tolerance as in test_sample_draw: float rounding at a boundary may move a token.
    assert np.mean(outputs["draw.tokens"][sampling] != expected_tokens[sampling]) <= 0.05
    assert int(outputs["zeros.nonzero"]) == 0, "rz_kernels.zero_pages left non-zero bytes"
    assert int(outputs["write.mismatches"]) == 0, "rz_kernels.cache_write wrote other bytes than the scatters"


@pytest.mark.parametrize(
    "features, variant",
    [
        ({"asimddp", "asimdhp", "i8mm"}, "neon_i8mm"),
        ({"asimddp", "asimdhp"}, "neon_dotprod"),
        ({"asimdhp", "i8mm"}, None),  # i8mm alone (no dot product) is not enough
        (set(), None),
    ],
)
def test_an_aarch64_cpu_runs_the_best_variant_its_features_allow(monkeypatch, features, variant):
    monkeypatch.setattr(cpu_ffi, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu_ffi, "cpu_features", lambda: frozenset(features))
    runnable = [v.name for v in build.variants_for("aarch64") if cpu_ffi.runnable(v)]
    assert (runnable[0] if runnable else None) == variant


@pytest.mark.skipif(build.machine() == "aarch64", reason="this is an aarch64 machine")
def test_the_neon_variants_never_run_on_another_machine():
    assert not any(cpu_ffi.runnable(v) for v in build.variants_for("aarch64"))
    assert not set(cpu_ffi.ARM_FEATURES) & cpu_ffi.cpu_features()


@needs_emulation
@pytest.mark.parametrize(
    "cpu, has, lacks, variant",
    [("i8mm", {"asimddp", "asimdhp", "i8mm"}, set(), "neon_i8mm"), ("dotprod", {"asimddp", "asimdhp"}, {"i8mm"}, "neon_dotprod")],
)
def test_a_cpu_takes_the_best_variant_it_can_run(runs, cpu, has, lacks, variant):
    report, _ = runs[cpu]
    assert has <= set(report["features"]) and not lacks & set(report["features"])
    assert report["selected"] == variant and report["available"]
    assert report["library"].endswith(f"/lib/rz_cpu_{variant}.so")
    assert report["stream_read_gbps"] > 0


@needs_emulation
@pytest.mark.parametrize("cpu", ["i8mm", "dotprod"])
def test_neon_kernels_match_references(workdir, runs, cpu):
    check_kernels(workdir, runs[cpu][1])


@needs_emulation
def test_i8mm_and_dotprod_agree_bit_for_bit(runs):
    """Both variants take the same float operations per output (only the integer dots' instructions
    differ), so a model gives the same tokens on an M1 and on a Graviton 3."""
    i8mm, dotprod = runs["i8mm"][1], runs["dotprod"][1]
    assert i8mm.keys() == dotprod.keys()
    for key in i8mm:
        if not key.startswith("attention"):
            np.testing.assert_array_equal(i8mm[key], dotprod[key], err_msg=key)


@needs_emulation
def test_a_cpu_without_dotprod_takes_the_xla_paths(workdir, runs):
    report, outputs = runs["neither"]
    assert "asimddp" not in report["features"]
    assert report["selected"] is None and not report["available"]
    plan, arrays, expected = prepared(workdir)
    for case in plan["qmatmul"][:1]:
        key = case["key"]
        reference = np.concatenate([np.asarray(qmatmul_ref(jnp.asarray(arrays[f"{key}.x"]), w)) for w in expected[key]], axis=1)
        for m in case["rows"]:
            np.testing.assert_allclose(outputs[f"{key}.y{m}"], reference[:m], rtol=1e-5, atol=1e-5)
