"""The decode kernel (M = 1) streaming a model's real weights from DRAM, one role at a time.

    python benchmarks/kernels/bench_decode_stream.py MODEL.gguf [--layers 12] [--roles gate_up,down,qkv,o]

One jitted sweep calls the kernel once per layer on that role's weights (gate and up, or q, k
and v, in one call, as a decode step makes them), each call's x depending on the last, so the
calls run one after another as in a model step. With enough layers the sweep reads more bytes
than the last-level cache holds, so it shows what a decode step's matmuls get from DRAM, which
bench_qmatmul.py (one weight, looped in cache) does not. Prints weight GB/s, best and median of
--rounds sweeps; compare with benchmarks/read_bandwidth.py.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support.kernels import real_qtensor  # noqa: E402

from rz_kernels.quantized_matmul import qmatmul_cpu  # noqa: E402

ROLES = {"gate_up": ("ffn_gate", "ffn_up"), "down": ("ffn_down",), "qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",)}


@jax.jit
def sweep(x, layers):
    total = jnp.float32(0)
    for weights in layers:
        total = total + qmatmul_cpu(x + total * 1e-9, weights)[0, 0]
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--layers", type=int, default=12, help="layers per sweep: enough that their bytes outgrow the cache")
    parser.add_argument("--roles", default=",".join(ROLES))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for role in args.roles.split(","):
        layers = [[real_qtensor(args.model, f"blk.{i}.{name}.weight") for name in ROLES[role]] for i in range(args.layers)]
        nbytes = sum(np.asarray(a).nbytes for weights in layers for qt in weights for a in qt.arrays.values())
        types = sorted({qt.ggml_type.name for weights in layers for qt in weights})
        k = layers[0][0].shape[-1]
        x = jnp.asarray(np.random.default_rng(0).standard_normal((1, k)).astype(np.float32))
        sweep(x, layers).block_until_ready()
        seconds = []
        for _ in range(args.rounds):
            started = time.perf_counter()
            sweep(x, layers).block_until_ready()
            seconds.append(time.perf_counter() - started)
        print(f"{role:8s} {'/'.join(types):10s} K={k:<6d} {nbytes / 1e9:.2f} GB: "
              f"best {nbytes / min(seconds) / 1e9:.1f} GB/s, median {nbytes / statistics.median(seconds) / 1e9:.1f}", flush=True)


if __name__ == "__main__":
    main()
