"""Decode speed with the model split over N devices (rz.sharding) against one device, engines interleaved.

    python benchmarks/tensor_parallel.py MODEL.gguf --sizes 1 2 --rounds 3 --tokens 64 [--threads-per-device T] [--json OUT]

Run it on a shape twin (benchmarks/shape_twin.py write benchmarks/twins/llama-3.2-1b-q4_k_m.json
TWIN.gguf) to measure a model's shapes without its file. On a CPU the devices are the host's cores
presented as N XLA devices (set here before JAX starts); each device's C++ kernels still use the
whole thread pool unless --threads-per-device caps them (RZ_CPU_THREADS): with 1 on this 2-core
machine, TP 2 is one device per core, to be set against TP 1 on both cores (a run without the cap).
The decode rate is taken from rz's own timings (decode seconds over the tokens after the first).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--threads-per-device", type=int, help="cap each device's C++ kernel threads (RZ_CPU_THREADS)")
    parser.add_argument("--json", type=Path, help="write the figures here too")
    args = parser.parse_args()
    if args.threads_per_device:
        os.environ["RZ_CPU_THREADS"] = str(args.threads_per_device)  # read when the kernel library loads

    from rz.bench.environment import cpu_info

    load_before = list(os.getloadavg())
    import jax

    jax.config.update("jax_num_cpu_devices", max(args.sizes))
    import rz

    engines = {size: rz.LLM(args.model, n_ctx=args.n_ctx, max_batch=1, compilation_cache=False, tensor_parallel=size)
               for size in args.sizes}
    prompt = "The history of the printing press"
    for llm in engines.values():  # compile every step before timing
        llm.generate(prompt, max_tokens=8, temperature=0, ignore_eos=True)
    rates = {size: [] for size in args.sizes}
    for _ in range(args.rounds):
        for size, llm in engines.items():
            completion = llm.generate(prompt, max_tokens=args.tokens, temperature=0, ignore_eos=True)
            decoded = completion.usage["completion_tokens"] - 1
            rates[size].append(decoded / completion.timings["decode_seconds"])
    best = {size: max(values) for size, values in rates.items()}
    report = {
        "model": args.model.name,
        "cpu": cpu_info(),
        "load_average_before": load_before,
        "threads_per_device": args.threads_per_device or os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "tokens": args.tokens,
        "rounds": args.rounds,
        "decode_tok_s": {str(size): values for size, values in rates.items()},
        "best_tok_s": {str(size): value for size, value in best.items()},
        "scaling_vs_1": {str(size): best[size] / best[args.sizes[0]] for size in args.sizes},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
