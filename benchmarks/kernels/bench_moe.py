"""A mixture-of-experts layer's routed experts on Qwen3-30B-A3B's shapes (128 experts, 8 per token,
each 768 x 2048; gate/up Q4_K, down Q4_K or Q6_K as the Q4_K_M mix has them): rz's C++ experts'
kernel (rz_kernels.moe_matmul) against the XLA paths it replaced (rz.models.moe: each choice's
slice through the dense kernel at decode, groups of 32 rows per expert beyond), interleaved
round by round in one process.

    python benchmarks/kernels/bench_moe.py [--tokens 1 4 64 256] [--rounds 5] [--down Q4_K]

Random weights and routing (each token's 8 experts drawn at random). Each figure is the
minimum over the rounds of one layer call, in ms, and for decode-sized steps the GB/s of the
chosen experts' bytes (what a step must read: the distinct experts its tokens chose).
"""

import argparse
import sys
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from support.kernels import activations, random_qtensor  # noqa: E402

from rz.models import moe  # noqa: E402
from rz_kernels.ggml_types import GGMLType  # noqa: E402
from rz_kernels.quants import QTensor  # noqa: E402

N_EXPERT, N_USED, N_EMBD, N_FF = 128, 8, 2048, 768


def nbytes(qt: QTensor) -> int:
    return sum(array.nbytes for array in qt.arrays.values())


def layer(experts: moe.Experts, cfg, kernel: bool):
    """The routed experts' sum for a given routing, by the kernel or by the XLA paths."""

    def run(x, weights, ids):
        if kernel:
            return moe._indexed(experts, x, weights, ids)
        each_choice = x.shape[0] * cfg.n_expert_used < cfg.n_expert
        return moe._each_choice(experts, x, weights, ids) if each_choice else moe._by_expert(experts, x, weights, ids, cfg)

    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 64, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--down", default="Q4_K", help="the down projection's type (the mix has Q4_K and Q6_K)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    experts = moe.Experts(
        router=random_qtensor(rng, GGMLType.F32, (N_EXPERT, N_EMBD)),
        gate=random_qtensor(rng, GGMLType.Q4_K, (N_EXPERT, N_FF, N_EMBD)),
        up=random_qtensor(rng, GGMLType.Q4_K, (N_EXPERT, N_FF, N_EMBD)),
        down=random_qtensor(rng, GGMLType[args.down], (N_EXPERT, N_EMBD, N_FF)),
        shared=None,
    )
    expert_bytes = sum(nbytes(qt) for qt in (experts.gate, experts.up, experts.down)) / N_EXPERT
    cfg = types.SimpleNamespace(n_expert=N_EXPERT, n_expert_used=N_USED, normalize_expert_weights=True)
    runs = {"kernel": layer(experts, cfg, True), "xla": layer(experts, cfg, False)}
    print(f"experts: {N_EXPERT} x (gate, up Q4_K {N_FF}x{N_EMBD}; down {args.down} {N_EMBD}x{N_FF}), "
          f"{expert_bytes / 2**20:.2f} MiB each; {N_USED} per token")
    print(f"{'tokens':>6} {'experts read':>12} {'kernel ms':>10} {'xla ms':>10} {'speed-up':>8} {'kernel GB/s':>11} {'xla GB/s':>9}")
    for m in args.tokens:
        x = jnp.asarray(activations(rng, m, N_EMBD))
        ids_np = np.stack([rng.choice(N_EXPERT, N_USED, replace=False) for _ in range(m)]).astype(np.int32)
        ids = jnp.asarray(ids_np)
        weights = jax.nn.softmax(jnp.asarray(rng.standard_normal((m, N_USED)), jnp.float32), axis=-1)
        for run in runs.values():
            run(x, weights, ids).block_until_ready()  # compile, warm up
        best = {name: float("inf") for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run(x, weights, ids).block_until_ready()
                best[name] = min(best[name], time.perf_counter() - start)
        read = len(np.unique(ids_np)) * expert_bytes
        print(f"{m:>6} {len(np.unique(ids_np)):>12} {best['kernel'] * 1e3:>10.2f} {best['xla'] * 1e3:>10.2f} "
              f"{best['xla'] / best['kernel']:>7.2f}x {read / best['kernel'] / 1e9:>11.2f} {read / best['xla'] / 1e9:>9.2f}")


if __name__ == "__main__":
    main()
