"""Microbenchmark of the quantized matmul paths on the real models' weights, against the machine's
limits and against llama.cpp's own kernel.

    python benchmarks/kernels/bench_qmatmul.py [--quick] [--m 1 8 512] [--threads 1 2] [--rounds 7]

For every distinct weight (type, N x K) of Gemma 3 270M and SmolLM2 135M, and each M, it
validates every path against rz_kernels.quants.qmatmul_ref (NMSE), then times the paths round-robin
(so that the load other processes put on the machine falls on all of them alike) and prints the
median per call: weight GB/s (weight bytes / time: what decode is bound by), GFLOP/s, and the
share of the measured memory bandwidth (M <= 16) or of the measured int8 peak (larger M).

Paths:
  rz/<t>       the C++ kernel (rz_kernels.qmatmul_cpu) capped at t threads, called `--inner`
               times inside one jitted loop, so per-call dispatch does not count (as in a model step)
  ggml/<t>     llama.cpp's ggml_mul_mat on the same GGUF bytes, t threads (needs llama-cpp-python)
  xla_ref      rz_kernels.quants.qmatmul_ref: dequantize, then an f32 dot (timed with --ref-rounds)

It ends with each model's per-token matmul time at each M: the rate the matmuls alone allow.
The machine is shared: take medians, rerun to compare; RZ_BENCH_MIN=1 reports the minimum of
the rounds instead, steadier where neighbours move the medians (to compare two builds, run them
interleaved and compare minimums).
"""

import argparse
import os
import functools
import statistics
import sys
import time
from pathlib import Path
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from rz.gguf import GGUFFile
from rz.model_files import gemma3_270m_path, smollm2_135m_path
from rz_kernels import cpu_ffi
from rz_kernels.quantized_matmul import CPU_FFI_ARRAYS, qmatmul_cpu
from rz_kernels.quants import qmatmul_ref

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support import ggml_oracle  # noqa: E402
from support.kernels import activations, nmse, real_qtensor  # noqa: E402

MODELS = {"gemma3-270m": gemma3_270m_path, "smollm2-135m": smollm2_135m_path}
QUICK = {"token_embd.weight", "blk.0.ffn_gate.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight"}


def model_weights(path) -> dict[tuple, tuple[str, int]]:
    """(type, N, K) -> (a tensor of that shape, how many matmuls of it a token runs)."""
    found: dict[tuple, list] = {}
    with GGUFFile(path) as f:
        for name, info in f.tensors.items():
            if len(info.shape) == 2 and info.ggml_type in CPU_FFI_ARRAYS:
                entry = found.setdefault((info.ggml_type, *info.shape), [name, 0])
                entry[1] += 1
    return {key: tuple(value) for key, value in found.items()}


def rz_looped(max_threads: int, inner: int, variant=None):
    """A jitted loop of `inner` kernel calls, each on a freshly offset x (no call can be reused);
    variant: a build of the kernel (default: the one this CPU runs)."""

    @jax.jit
    def run(x, qt):
        def body(i, total):
            return total + qmatmul_cpu(x + i.astype(jnp.float32) * 1e-9, qt, max_threads, variant)[0, 0]

        return jax.lax.fori_loop(0, inner, body, jnp.float32(0))

    return lambda x, qt: run(x, qt).block_until_ready()


def repeat(fn, times: int) -> None:
    for _ in range(times):
        fn()


def reference(x, qt) -> None:
    jax.block_until_ready(_reference(x, qt))


_reference = jax.jit(qmatmul_ref)


# A pause before each timer: the threads of the timer before it (llama.cpp's OpenMP workers, rz's
# spinning ones) keep spinning for a while after their last call, and would take a core from it.
SETTLE_SECONDS = 0.05


def round_robin(timers: dict, rounds: int) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) seconds per call of each timer, the timers run in turns."""
    samples = defaultdict(list)
    for timer in timers.values():
        timer()  # warm-up
    for _ in range(rounds):
        for name, timer in timers.items():
            time.sleep(SETTLE_SECONDS)
            samples[name].append(timer())
    return {name: tuple((min(column) if os.environ.get("RZ_BENCH_MIN") else statistics.median(column)) for column in zip(*values)) for name, values in samples.items()}


def per_call(fn, calls: int):
    """A timer: (wall, process CPU) seconds per call of fn, which makes `calls` calls. CPU time
    does not count the time other processes take the cores: on a shared machine it is the
    steadier measure of a kernel's cost (for one thread; with more it also counts waiting)."""

    def timer():
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        return (time.perf_counter() - start) / calls, (time.process_time() - start_cpu) / calls

    return timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 8, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ref-rounds", type=int, default=2, help="rounds for the (slow) XLA reference; 0 skips it")
    parser.add_argument("--quick", action="store_true", help="only the LM heads and one layer's MLP")
    parser.add_argument("--no-ggml", action="store_true", help="skip llama.cpp's kernel")
    args = parser.parse_args()

    if not cpu_ffi.available():
        raise SystemExit("the C++ CPU kernels are not available here: nothing to benchmark")
    use_ggml = not args.no_ggml and ggml_oracle.available()
    bandwidth = cpu_ffi.stream_read_gbps(256 << 20, repeats=10)
    bandwidth_1 = cpu_ffi.stream_read_gbps(256 << 20, threads=1, repeats=10)
    peak_gmacs = cpu_ffi.int8_dot_peak_gmacs()
    print(
        f"memory bandwidth (streaming read of 256 MiB, best of 10): {bandwidth:.1f} GB/s all cores, {bandwidth_1:.1f} one core"
    )
    print(f"int8 dot peak (the kernel's maddubs+madd+cvt+fma step, best of 5): {2 * peak_gmacs:.0f} GOP/s all cores")
    print(f"llama.cpp comparison: {'ggml from llama-cpp-python' if use_ggml else 'unavailable'}\n")
    print(
        f"{'model':13} {'tensor':24} {'type':5} {'N x K':>13} {'M':>4} {'path':8} {'ms':>9} {'cpu ms':>9} {'GB/s':>6} {'GFLOP/s':>8} {'of peak':>7} {'NMSE':>8}"
    )

    rng = np.random.default_rng(0)
    per_token: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for model, path_fn in MODELS.items():
        path = path_fn()
        weights = model_weights(path)
        for (ggml_type, n, k), (name, count) in sorted(weights.items(), key=lambda item: -item[0][1] * item[0][2]):
            if args.quick and name not in QUICK:
                continue
            qt = real_qtensor(path, name)
            with GGUFFile(path) as f:
                raw = np.array(f.tensor_bytes(name))
            for m in args.m:
                if n * k * m > 262144 * 640 * 16:
                    continue  # an LM head at prefill size: llama.cpp computes the last token's logits only
                x = activations(rng, m, k)
                xj = jnp.asarray(x)
                expected = np.asarray(qmatmul_ref(xj, qt))
                inner = max(1, min(50, int(2e8 // (n * k * m))))
                timers, errors = {}, {}
                for threads in args.threads:
                    run = rz_looped(threads, inner)
                    errors[f"rz/{threads}"] = nmse(qmatmul_cpu(xj, qt, threads), expected)
                    timers[f"rz/{threads}"] = per_call(functools.partial(run, xj, qt), inner)
                    if use_ggml:
                        g = ggml_oracle.GGMLMatmul(raw, int(ggml_type), n, k, m, threads)
                        errors[f"ggml/{threads}"] = nmse(g(x), expected)
                        timers[f"ggml/{threads}"] = per_call(functools.partial(repeat, g.run, inner), inner)
                medians = round_robin(timers, args.rounds)
                if args.ref_rounds:
                    errors["xla_ref"] = 0.0
                    timer = per_call(functools.partial(reference, xj, qt), 1)
                    medians |= round_robin({"xla_ref": timer}, args.ref_rounds)
                for path_name, (seconds, cpu_seconds) in medians.items():
                    gbs = qt.nbytes / seconds / 1e9
                    gflops = 2 * m * n * k / seconds / 1e9
                    share = gbs / bandwidth if m <= 16 else gflops / (2 * peak_gmacs)
                    print(
                        f"{model:13} {name:24} {ggml_type.name:5} {f'{n} x {k}':>13} {m:4} {path_name:8} "
                        f"{seconds * 1e3:9.3f} {cpu_seconds * 1e3:9.3f} {gbs:6.1f} {gflops:8.1f} {share:7.0%} {errors[path_name]:8.1e}"
                    )
                    per_token[(model, m, path_name)][0] += count * seconds
                    per_token[(model, m, path_name)][1] += count * cpu_seconds
            print()
    print("per-token matmul time of each model (sum over its weights of the medians) and the rate it allows:")
    for (model, m, path_name), (seconds, cpu_seconds) in sorted(per_token.items()):
        kind = "decode" if m <= 16 else "prefill"
        print(
            f"  {model:13} M={m:<4} {path_name:8} {seconds * 1e3:9.2f} ms -> {m / seconds:8.1f} tok/s {kind}"
            f"   (cpu {cpu_seconds * 1e3:9.2f} ms)"
        )


if __name__ == "__main__":
    main()
