"""Microbenchmark: the attention of a chat turn's prompt chunks, at turn 1 and at turn 10 of
`rz.bench chat` (SmolLM2-135M's heads, f16 cache, 64-slot blocks of a shuffled pool), through
rz_kernels.attention as a prefill step calls it.

    python benchmarks/kernels/bench_chat_turn_attention.py [--rounds 9]

A turn prefills ~132 new tokens as a 128-token chunk and an 8-token one whose last steps are
padding (position -1): 6 real tokens at turn 1, 4 at turn 10. Turn 1 attends over nothing before
them; turn 10 over the ~1,185 positions of the turns before. The difference is
what grows from turn to turn: the rest of a turn (the matmuls, the sampling) does not depend
on the history. Each case is 30 calls (SmolLM2's layers) in one jitted loop, median of `rounds`,
cases interleaved. Prints milliseconds per 30 calls and the growth. Where the prompt kernel takes
int16 scores (AVX-512 VNNI) or bf16 values (AVX-512 BF16), the 128-token chunks also run with f32
products in their place, for comparison.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_paged_attention import looped

from rz_kernels import attention_kv, cpu_ffi
from rz_kernels.causal_attention import attention, prompt_attention_cpu

N_HEAD, N_KV, HEAD_DIM = 9, 3, 64
BLOCK_SIZE, N_TABLE = 64, 64  # a 4,096-position context
LAYERS = 30
# name: (history positions, chunk length, its real tokens)
CASES = {"turn 1, 128 chunk": (0, 128, 128), "turn 10, 128 chunk": (1185, 128, 128), "turn 1, 8 chunk": (128, 8, 6),
         "turn 10, 8 chunk": (1313, 8, 4)}


def pool_case(rng, table, history, length, live=None):
    """K/V pools holding positions [0, history + length) through `table`, the chunk's queries and
    positions (those past its first `live` steps -1, padding)."""
    n_pool = 2 * N_TABLE  # half the pool is other sequences'

    def pool():
        rows = rng.standard_normal((N_KV, N_TABLE * BLOCK_SIZE, HEAD_DIM)).astype(np.float32)
        blocks = np.zeros((n_pool, N_KV, BLOCK_SIZE, HEAD_DIM), np.float32)
        blocks[table] = rows.reshape(N_KV, N_TABLE, BLOCK_SIZE, HEAD_DIM).transpose(1, 0, 2, 3)
        return attention_kv.store(jnp.asarray(blocks), "f16")

    positions = np.arange(N_TABLE * BLOCK_SIZE, dtype=np.int32)
    positions[history + length :] = -1
    pool_positions = np.full((n_pool, BLOCK_SIZE), -1, np.int32)
    pool_positions[table] = positions.reshape(N_TABLE, BLOCK_SIZE)
    q = jnp.asarray(rng.standard_normal((1, N_HEAD, length, HEAD_DIM)), jnp.float32)
    q_positions = np.arange(history, history + length, dtype=np.int32)[None]
    q_positions[:, length if live is None else live :] = -1
    q_positions = jnp.asarray(q_positions)
    return q, pool(), pool(), q_positions, jnp.asarray(pool_positions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    table = rng.permutation(2 * N_TABLE)[:N_TABLE].astype(np.int32)
    kernel = functools.partial(attention, block_table=jnp.asarray(table[None]), scale=HEAD_DIM**-0.5, keys_in_order=True)
    cases = {name: pool_case(rng, table, *case) for name, case in CASES.items()}
    runs = {name: looped(kernel, LAYERS, *operands) for name, operands in cases.items()}
    variant = cpu_ffi.selected()
    f32_modes = {
        "f32 scores": {"int16_scores": False} if variant is not None and cpu_ffi.has_int16_scores(variant) else None,
        "f32 values": {"bf16_values": False} if variant is not None and cpu_ffi.has_bf16_values(variant) else None,
    }
    if all(f32_modes.values()):
        f32_modes["f32 products"] = {"int16_scores": False, "bf16_values": False}
    for name, mode in f32_modes.items():
        if mode is None:
            continue
        f32_kernel = functools.partial(
            prompt_attention_cpu, block_table=jnp.asarray(table[None]), scale=HEAD_DIM**-0.5, keys_in_order=True, **mode
        )
        for turn in ("turn 1", "turn 10"):
            runs[f"{turn}, 128 chunk, {name}"] = looped(f32_kernel, LAYERS, *cases[f"{turn}, 128 chunk"])
    samples = {name: [] for name in runs}
    for fn, operands in runs.values():
        jax.block_until_ready(fn(*operands))
    for _ in range(args.rounds):
        for name, (fn, operands) in runs.items():
            started = time.perf_counter()
            jax.block_until_ready(fn(*operands))
            samples[name].append(time.perf_counter() - started)
    ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
    for name, value in ms.items():
        print(f"{name:34} {value:7.2f} ms per {LAYERS} layers")
    for chunk in ("128 chunk", "8 chunk", *(f"128 chunk, {name}" for name in f32_modes)):
        if f"turn 10, {chunk}" in ms:
            print(f"growth, {chunk}: {ms[f'turn 10, {chunk}'] - ms[f'turn 1, {chunk}']:.2f} ms")


if __name__ == "__main__":
    main()
