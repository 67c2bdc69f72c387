"""Microbenchmark: the C++ attention kernels on a paged pool (read through a block table) against
the same slots in a slab, per block size.

    python benchmarks/kernels/bench_paged_attention.py [--calls 200] [--rounds 5]

Decode (one query per sequence) at SmolLM2-135M's and Gemma3-270M's attention shapes over 512 and
4,096 positions, f16 and q8_0 caches, and the prompt kernel (128 queries over 1,200 positions of
history). The pool's blocks are shuffled (a long-running server's pool is fragmented); the slab
holds the same slots in order. Each variant is validated against the slab bit for bit, then timed
as `calls` kernel calls inside one jitted loop (so dispatch is not timed), median of `rounds`,
variants interleaved. Prints microseconds per call, the pool's cost against the slab, and the K/V
bytes read per second.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from rz_kernels import attention_kv, cpu_ffi
from rz_kernels.causal_attention import decode_attention_cpu, prompt_attention_cpu

# name: (query heads, KV heads, head dim)
MODELS = {"smollm2-135m": (9, 3, 64), "gemma3-270m": (4, 1, 256)}
BLOCK_SIZES = (16, 32, 64, 128, 256)


def slab_and_pools(rng, n_kv, head_dim, n_slots, cache_type):
    """K/V of one sequence's n_slots positions in a slab, and per block size the same slots in a
    shuffled pool with its positions and table."""
    k, v = (rng.standard_normal((1, n_kv, n_slots, head_dim)).astype(np.float32) for _ in range(2))
    positions = np.arange(n_slots, dtype=np.int32)[None]
    slab = (attention_kv.store(jnp.asarray(k), cache_type), attention_kv.store(jnp.asarray(v), cache_type), jnp.asarray(positions))
    pools = {}
    for block_size in BLOCK_SIZES:
        n_table = n_slots // block_size
        n_pool = 2 * n_table  # half the pool belongs to other sequences
        table = rng.permutation(n_pool)[:n_table].astype(np.int32)

        def pool(x):
            blocks = np.zeros((n_pool, n_kv, block_size, head_dim), np.float32)
            blocks[table] = x[0].reshape(n_kv, n_table, block_size, head_dim).transpose(1, 0, 2, 3)
            return attention_kv.store(jnp.asarray(blocks), cache_type)

        pool_positions = np.full((n_pool, block_size), -1, np.int32)
        pool_positions[table] = positions[0].reshape(n_table, block_size)
        pools[block_size] = (pool(k), pool(v), jnp.asarray(pool_positions), jnp.asarray(table[None]))
    return slab, pools


def looped(kernel, calls, q, *operands, **options):
    """`calls` calls of the kernel in one jitted loop, each query nudged by the last output so
    that no call is hoisted or merged."""

    @jax.jit
    def run(q, *operands):
        def step(_, carry):
            q, _ = carry
            out = kernel(q, *operands, **options)
            return q + 1e-30 * out[..., :1], out

        return jax.lax.fori_loop(0, calls, step, (q, jnp.zeros(q.shape[:3] + (operands[1].shape[-1],), jnp.float32)))[1]

    return run, (q, *operands)


def median_seconds(fns: dict, rounds: int) -> dict:
    samples = {name: [] for name in fns}
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def kv_bytes(stored) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(stored))


def compare(label, kernel, q, q_positions, slab, pools, calls, rounds, **options):
    """Validate each pool against the slab (same bits), time them, print a row per layout."""
    k, v, positions = slab
    expected = kernel(q, k, v, q_positions, positions, **options)
    fns = {"slab": looped(kernel, calls, q, k, v, q_positions, positions, **options)}
    for block_size, (k_pool, v_pool, pool_positions, table) in pools.items():
        got = kernel(q, k_pool, v_pool, q_positions, pool_positions, block_table=table, **options)
        np.testing.assert_array_equal(got, expected, err_msg=f"{label} block {block_size}")
        fns[block_size] = looped(
            functools.partial(kernel, block_table=table), calls, q, k_pool, v_pool, q_positions, pool_positions, **options
        )
    seconds = median_seconds(fns, rounds)
    read = kv_bytes(k) + kv_bytes(v)
    for name, total in seconds.items():
        per_call = total / calls
        cost = per_call / (seconds["slab"] / calls) - 1
        layout = "slab" if name == "slab" else f"pool {name}"
        print(f"{label:38} {layout:9} {per_call * 1e6:9.1f} us {cost * 100:+6.1f}% {read / per_call / 1e9:7.1f} GB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    variant = cpu_ffi.selected()
    print(f"variant {variant.name if variant else None}; bandwidth {cpu_ffi.stream_read_gbps(256 << 20, repeats=5):.1f} GB/s (streaming read)")
    rng = np.random.default_rng(0)
    for model, (n_head, n_kv, head_dim) in MODELS.items():
        for cache_type in ("f16", "q8_0"):
            for n_slots in (512, 4096):
                slab, pools = slab_and_pools(rng, n_kv, head_dim, n_slots, cache_type)
                q = jnp.asarray(rng.standard_normal((1, n_head, 1, head_dim)), jnp.float32)
                q_positions = jnp.asarray([[n_slots - 1]], jnp.int32)
                label = f"decode {model} {cache_type} S={n_slots}"
                compare(label, decode_attention_cpu, q, q_positions, slab, pools, args.calls, args.rounds, scale=head_dim**-0.5)
    # A prompt chunk of 128 queries after 1,200 positions, in the first 1,536 slots (keys in order).
    for model, (n_head, n_kv, head_dim) in MODELS.items():
        slab, pools = slab_and_pools(rng, n_kv, head_dim, 1536, "f16")
        q = jnp.asarray(rng.standard_normal((1, n_head, 128, head_dim)), jnp.float32)
        q_positions = jnp.arange(1200, 1328, dtype=jnp.int32)[None]
        label = f"prompt {model} f16 T=128 after 1200"
        compare(label, prompt_attention_cpu, q, q_positions, slab, pools, max(1, args.calls // 20), args.rounds,
                scale=head_dim**-0.5, keys_in_order=True)


if __name__ == "__main__":
    main()
