"""The C++ CPU kernels' variants side by side (rz_kernels.build), on random weights of the Llama
3.2 1B twin's shapes, interleaved round by round in one process.

    python benchmarks/kernels/bench_variants.py [M ...]      # default M = 1 8 (run from anywhere)

Each timer is a jitted loop of qmatmul_cpu(..., variant=v) calls (as bench_qmatmul.py's rz/N),
the minimum of 7 rounds. Weights this size stay in a large L3 between calls: the figures are the
instructions' cost, not a decode step's DRAM-bound speed.
"""

import sys
import time

import jax.numpy as jnp
import numpy as np
from bench_qmatmul import rz_looped

from rz_kernels.ggml_types import GGMLType
from rz_kernels import cpu_ffi
from rz_kernels.build import variants_for
from support.kernels import activations, random_qtensor  # noqa: E402  (bench_qmatmul puts tests/ on the path)

SHAPES = [
    (GGMLType.Q4_K, (8192, 2048)),  # ffn_gate / ffn_up
    (GGMLType.Q6_K, (2048, 8192)),  # ffn_down
    (GGMLType.Q4_K, (2048, 2048)),  # attn_q / attn_output
    (GGMLType.Q6_K, (32768, 2048)),  # a quarter of the LM head
    (GGMLType.Q8_0, (8192, 2048)),
    (GGMLType.Q4_0, (8192, 2048)),
]
ROUNDS = 7


def main(argv: list[str]) -> None:
    variants = [v for v in variants_for() if cpu_ffi.runnable(v) and cpu_ffi.built(v)]
    rng = np.random.default_rng(0)
    for ggml_type, shape in SHAPES:
        qt = random_qtensor(rng, ggml_type, shape)
        nbytes = sum(np.asarray(a).nbytes for a in qt.arrays.values())
        inner = max(2, int(2e8 / nbytes))
        for m in [int(a) for a in argv] or [1, 8]:
            x = jnp.asarray(activations(rng, m, shape[1]))
            timers = {v.name: rz_looped(0, inner, v) for v in variants}
            for timer in timers.values():
                timer(x, qt)  # compile, warm up
            best = {name: float("inf") for name in timers}
            for _ in range(ROUNDS):
                for name, timer in timers.items():
                    start = time.perf_counter()
                    timer(x, qt)
                    best[name] = min(best[name], (time.perf_counter() - start) / inner)
            cells = "  ".join(f"{name}: {t * 1e3:7.3f} ms {nbytes / t / 1e9:5.1f} GB/s" for name, t in best.items())
            print(f"{ggml_type.name:5} {shape[0]:6}x{shape[1]:5} M={m:2}  {cells}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
