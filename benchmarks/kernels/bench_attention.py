"""Microbenchmark of attention on CPU at the real models' shapes: decode over a KV cache, and prefill.

    python benchmarks/kernels/bench_attention.py [--rounds 7]

Paths: cpu (rz_kernels.causal_attention.attention_cpu, what `attention` runs on CPU), ref
(attention_ref: every score materialized, HIGHEST precision). Each is validated against the
reference, then timed round-robin (median). Decode is memory-bound: it prints the K/V bytes read
per second against the measured streaming bandwidth; prefill prints GFLOP/s (QK^T and PV over
all T x S pairs, masked ones included, as computed).

The Pallas kernels (flash_attention, decode_attention) target GPUs; on CPU they run only in
interpret mode, which validates them (tests/kernels) but says nothing about speed.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rz_kernels import cpu_ffi
from rz_kernels.causal_attention import attention_cpu, attention_ref

# name: (query heads, KV heads, head dim, sliding window)
MODELS = {"gemma3-270m": (4, 1, 256, 512), "smollm2-135m": (9, 3, 64, 0)}
# (batch, queries, key slots, sliding): decode over short and long caches, batched decode, a prompt.
CASES = [(1, 1, 512, True), (1, 1, 4096, False), (1, 1, 32768, False), (8, 1, 4096, False), (1, 512, 512, False)]


def inputs(batch, n_head, n_kv, head_dim, length, n_keys, rng):
    q = jnp.asarray(rng.standard_normal((batch, n_head, length, head_dim)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((batch, n_kv, n_keys, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, n_kv, n_keys, head_dim)), jnp.float32)
    q_positions = jnp.tile(jnp.arange(n_keys - length, n_keys, dtype=jnp.int32), (batch, 1))
    k_positions = jnp.tile(jnp.arange(n_keys, dtype=jnp.int32), (batch, 1))
    return q, k, v, q_positions, k_positions


def median_seconds(fns: dict, rounds: int) -> dict:
    samples = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn())
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    bandwidth = cpu_ffi.stream_read_gbps(256 << 20, repeats=10) if cpu_ffi.available() else float("nan")
    print(f"memory bandwidth (streaming read of 256 MiB, best of 10): {bandwidth:.1f} GB/s\n")
    print(
        f"{'model':13} {'B':>2} {'T':>4} {'S':>6} {'window':>6} {'path':4} {'ms':>9} {'KV GB/s':>8} {'GFLOP/s':>8} {'max err':>8}"
    )
    rng = np.random.default_rng(0)
    for model, (n_head, n_kv, head_dim, model_window) in MODELS.items():
        for batch, length, n_keys, sliding in CASES:
            if sliding and not model_window:
                continue
            window = model_window if sliding else 0
            args_ = inputs(batch, n_head, n_kv, head_dim, length, n_keys, rng)
            options = {"window": window, "scale": head_dim**-0.5}
            paths = {
                "cpu": functools.partial(attention_cpu, *args_, **options),
                "ref": functools.partial(attention_ref, *args_, **options),
            }
            expected = paths["ref"]()
            errors = {name: float(jnp.max(jnp.abs(fn() - expected))) for name, fn in paths.items()}
            kv_bytes = args_[1].nbytes + args_[2].nbytes
            flops = 4 * batch * n_head * length * n_keys * head_dim
            for name, seconds in median_seconds(paths, args.rounds).items():
                print(
                    f"{model:13} {batch:2} {length:4} {n_keys:6} {window:6} {name:4} {seconds * 1e3:9.3f} "
                    f"{kv_bytes / seconds / 1e9:8.1f} {flops / seconds / 1e9:8.1f} {errors[name]:8.1e}"
                )


if __name__ == "__main__":
    main()
