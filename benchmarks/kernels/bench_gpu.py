"""The Pallas kernels and the engine on an NVIDIA GPU: speed against the card's measured bandwidth.

    python benchmarks/kernels/bench_gpu.py --skeletons DIR [--out results.json]

DIR holds shape skeletons (benchmarks/shape_twin.py save) of the real models. For each:
  1. qmatmul: every distinct (type, N x K) weight of the model, random blocks of that type, at
     M = 1, 8 (the Pallas decode kernel) and 512 (the prefill kernel), against
     rz_kernels.quants.qmatmul_ref (XLA: dequantize, then a dot): median time, weight GB/s, NMSE;
  2. attention: the model's head shapes, flash attention over a 512-token prompt and decode
     attention over a 4,096-slot cache, against attention_ref;
  3. the engine: the model's shape twin (same metadata, tokenizer, types and shapes, random
     weights) through rz.LLM: pp512, tg128 and 8 sequences decoding together.
Bandwidth is measured first (a device copy, bytes read + written), as the roofline.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from shape_twin import write_twin  # noqa: E402
from support.kernels import activations, nmse, random_qtensor  # noqa: E402

from rz_kernels.ggml_types import GGMLType  # noqa: E402
from rz_kernels.quants import qmatmul_ref  # noqa: E402
from rz_kernels import qmatmul  # noqa: E402
from rz_kernels.causal_attention import attention, attention_ref  # noqa: E402


def median_seconds(fn, *args, repeats: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float:
    x = jnp.ones((1 << 28,), jnp.float32)
    scale = jax.jit(lambda a: a * 1.0001)
    return 2 * x.nbytes / median_seconds(scale, x) / 1e9


def matmul_rows(skeleton: dict, hbm: float) -> list[dict]:
    rng = np.random.default_rng(0)
    shapes = sorted(
        {(t["type"], tuple(t["shape"])) for t in skeleton["tensors"] if len(t["shape"]) == 2 and t["type"] not in (0, 1)}
    )
    rows = []
    kernel = jax.jit(qmatmul)
    reference = jax.jit(qmatmul_ref)
    for type_id, (n, k) in shapes:
        qt = random_qtensor(rng, GGMLType(type_id), (n, k))
        weight_bytes = sum(a.nbytes for a in qt.arrays.values())
        for m in (1, 8, 512):
            x = jnp.asarray(activations(rng, m, k))
            row = {"type": GGMLType(type_id).name, "n": n, "k": k, "m": m}
            try:
                ours = median_seconds(kernel, x, qt)
                ref = median_seconds(reference, x, qt)
                row |= {
                    "pallas_us": ours * 1e6,
                    "xla_ref_us": ref * 1e6,
                    "pallas_weight_gbps": weight_bytes / ours / 1e9,
                    "fraction_of_hbm": weight_bytes / ours / 1e9 / hbm,
                    "tflops": 2 * m * n * k / ours / 1e12,
                    "nmse": nmse(kernel(x, qt), reference(x, qt)),
                }
            except Exception as error:  # a failing shape is reported, the rest still run
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def attention_rows(skeleton: dict) -> list[dict]:
    meta = {item["key"]: item["value"] for item in skeleton["metadata"]}
    arch = skeleton["architecture"]
    n_head, n_kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    head_dim = meta.get(f"{arch}.attention.key_length", meta[f"{arch}.embedding_length"] // n_head)
    rng = np.random.default_rng(1)
    rows = []
    for name, t, s in (("flash_prefill", 512, 512), ("decode", 1, 4096)):
        q = jnp.asarray(rng.standard_normal((1, n_head, t, head_dim)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((1, n_kv, s, head_dim)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((1, n_kv, s, head_dim)), jnp.float32)
        q_pos = jnp.arange(s - t, s, dtype=jnp.int32)[None]
        k_pos = jnp.arange(s, dtype=jnp.int32)[None]
        options = {"scale": head_dim**-0.5}
        ours = jax.jit(lambda *a: attention(*a, **options))
        ref = jax.jit(lambda *a: attention_ref(*a, **options))
        row = {"op": name, "heads": n_head, "kv_heads": n_kv, "head_dim": head_dim, "queries": t, "keys": s}
        try:
            seconds = median_seconds(ours, q, k, v, q_pos, k_pos)
            row |= {
                "pallas_us": seconds * 1e6,
                "xla_ref_us": median_seconds(ref, q, k, v, q_pos, k_pos) * 1e6,
                "kv_gbps": (k.nbytes + v.nbytes) / seconds / 1e9,
                "nmse": nmse(ours(q, k, v, q_pos, k_pos), ref(q, k, v, q_pos, k_pos)),
            }
        except Exception as error:
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def engine_rows(skeleton_path: Path, hbm: float) -> dict:
    import rz

    with tempfile.TemporaryDirectory() as tmp:
        twin = Path(tmp) / "twin.gguf"
        write_twin(skeleton_path, twin)
        weight_bytes = twin.stat().st_size
        started = time.perf_counter()
        llm = rz.LLM(twin, n_ctx=1024, max_batch=8, compilation_cache=False)
        result = {"model": skeleton_path.stem, "file_bytes": weight_bytes, "load_seconds": time.perf_counter() - started}
        prompt = list(range(10, 522))
        greedy = {"temperature": 0.0, "ignore_eos": True}
        started = time.perf_counter()
        llm.generate(prompt, max_tokens=2, **greedy)
        llm.generate(prompt[:16], max_tokens=8, **greedy)
        llm.generate([prompt[:16]] * 8, max_tokens=8, **greedy)
        result["warmup_seconds"] = time.perf_counter() - started
        pp, tg, batch = [], [], []
        for _ in range(3):
            out = llm.generate(prompt, max_tokens=1, **greedy)
            pp.append(512 / out.timings["prefill_seconds"])
            out = llm.generate(prompt[:16], max_tokens=129, **greedy)
            tg.append(128 / out.timings["decode_seconds"])
            outs = llm.generate([prompt[i : i + 16] for i in range(8)], max_tokens=65, **greedy)
            decode = max(o.timings["total_seconds"] for o in outs) - max(o.timings["time_to_first_token_seconds"] for o in outs)
            batch.append(8 * 64 / decode)
        result |= {
            "pp512_tok_s": statistics.median(pp),
            "tg128_tok_s": statistics.median(tg),
            "batch8_aggregate_tok_s": statistics.median(batch),
            "tg128_weight_gbps": weight_bytes * statistics.median(tg) / 1e9,
            "tg128_fraction_of_hbm": weight_bytes * statistics.median(tg) / 1e9 / hbm,
            "compilations": dict(getattr(llm, "compilations", {}) or {}),
        }
        print(json.dumps({k: v for k, v in result.items() if k != "compilations"}), flush=True)
        return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skeletons", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("bench_gpu.json"))
    parser.add_argument("--parts", default="matmul,attention,engine")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    device = jax.devices()[0]
    report = {"device": f"{device.platform} {device.device_kind}", "jax": jax.__version__}
    report["copy_gbps"] = copy_bandwidth()
    print(json.dumps(report), flush=True)
    for skeleton_path in sorted(args.skeletons.glob("*.json")):
        skeleton = json.loads(skeleton_path.read_text())
        entry = report.setdefault(skeleton_path.stem, {})
        if "matmul" in parts:
            entry["qmatmul"] = matmul_rows(skeleton, report["copy_gbps"])
        if "attention" in parts:
            entry["attention"] = attention_rows(skeleton)
        args.out.write_text(json.dumps(report, indent=1))
    for skeleton_path in sorted(args.skeletons.glob("*.json")):
        if "engine" in parts:
            try:
                report[skeleton_path.stem]["engine"] = engine_rows(skeleton_path, report["copy_gbps"])
            except Exception as error:
                report[skeleton_path.stem]["engine"] = {"error": f"{type(error).__name__}: {error}"[:500]}
                print("engine failed:", error, flush=True)
            args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
