"""A prompt's matmuls (many rows of x) on the Llama 3.2 1B twin's weight shapes (and a layer's MLP
of each real model): rz's C++ kernel,
XLA's f32 GEMM on the dequantized weight (the path prompts took before the int8 prefill GEMM), and
llama.cpp's ggml_mul_mat, interleaved round by round in one process.

    python benchmarks/kernels/bench_prefill.py [--m 512] [--threads 2] [--rounds 5] [--types Q4_K Q6_K Q8_0]

Random weights (tests/support/kernels.random_blocks: the same GGUF bytes for rz and ggml). Each
figure is the minimum over the rounds of one call, in ms and GFLOP/s (2 M N K / time). With
--threads 1 the time is the process's CPU time, not wall time: on a shared machine it leaves out
the time other processes hold the core (with more threads it would count spinning workers).
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support import ggml_oracle  # noqa: E402
from support.kernels import activations, random_blocks  # noqa: E402

from rz.quants import pack  # noqa: E402
from rz_kernels.ggml_types import GGMLType  # noqa: E402
from rz_kernels.quantized_matmul import qmatmul_cpu, qmatmul_f32_after  # noqa: E402

# (type, N x K, what it is in the twin's layer), by the Q4_K_M mix and the Q8_0 twin.
SHAPES = [
    (GGMLType.Q4_K, (2048, 2048), "attn_q / attn_output"),
    (GGMLType.Q4_K, (512, 2048), "attn_k"),
    (GGMLType.Q6_K, (512, 2048), "attn_v"),
    (GGMLType.Q4_K, (8192, 2048), "ffn_gate / ffn_up"),
    (GGMLType.Q6_K, (2048, 8192), "ffn_down"),
    (GGMLType.Q8_0, (8192, 2048), "Q8_0 twin ffn_gate / ffn_up"),
    (GGMLType.Q8_0, (2048, 8192), "Q8_0 twin ffn_down"),
    (GGMLType.Q5_0, (2048, 640), "Gemma 3 270M ffn_gate / ffn_up"),
    (GGMLType.Q4_1, (1536, 576), "SmolLM2 135M ffn_gate / ffn_up"),
]


def seconds(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[512])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--types", nargs="+", default=None, help="only these types (GGMLType names)")
    parser.add_argument("--no-xla", action="store_true", help="skip XLA's f32 path")
    args = parser.parse_args()
    clock = time.process_time if args.threads == 1 else time.perf_counter
    rng = np.random.default_rng(0)
    rz = jax.jit(lambda x, qt: qmatmul_cpu(x, qt, args.threads))
    xla = jax.jit(qmatmul_f32_after)
    for ggml_type, (n, k), role in SHAPES:
        if args.types and ggml_type.name not in args.types:
            continue
        raw = random_blocks(rng, ggml_type, (n, k))
        qt = pack(raw, ggml_type, (n, k))
        for m in args.m:
            x_np = activations(rng, m, k)
            x = jnp.asarray(x_np)
            timers = {"rz": lambda: rz(x, qt).block_until_ready()}
            if not args.no_xla:
                timers["xla_f32"] = lambda: xla(x, qt).block_until_ready()
            if ggml_oracle.available():
                ggml = ggml_oracle.GGMLMatmul(raw, int(ggml_type), n, k, m, args.threads)
                ggml(x_np)
                timers["ggml"] = ggml.run
            for timer in timers.values():
                timer()  # compile, warm up
            best = {name: float("inf") for name in timers}
            for _ in range(args.rounds):
                for name, timer in timers.items():
                    best[name] = min(best[name], seconds(timer, clock))
            flop = 2.0 * m * n * k
            cells = "  ".join(f"{name}: {t * 1e3:8.2f} ms {flop / t / 1e9:6.1f} GFLOP/s" for name, t in best.items())
            print(f"{ggml_type.name:5} {n:5}x{k:5} M={m:4}  {cells}  ({role})", flush=True)


if __name__ == "__main__":
    main()
