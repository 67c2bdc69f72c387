"""Where rz's resident memory goes, phase by phase: pp512 then tg128 on one model, as rz.bench runs them.

After each phase (gc + malloc_trim first) it prints the phase's peak RSS, the RSS, and glibc's
arena figures (mallinfo2: bytes obtained from the system, in use, free; large blocks mmapped
apart), so that a change can be judged by what stays in use rather than by a noisy peak.
The per-step compilation cache decides whether steps are compiled or loaded: loaded ones keep
more (benchmarks/results/memory-session22.md).

    python benchmarks/executable_heap.py [--model smollm2|gemma3] [--no-compilation-cache]

For the allocation sites, run it under heaptrack (Debian's `heaptrack`):
    heaptrack -o /tmp/rz python benchmarks/executable_heap.py
    heaptrack_print -f /tmp/rz.zst --print-leaks 1
"""

import argparse
import ctypes
import gc
import re

import numpy as np


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def _status_mib(key: str) -> float:
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


def report(phase: str) -> None:
    """Print the phase's peak and what is resident after it, then start the next phase's peak."""
    gc.collect()
    _libc.malloc_trim(0)
    info, mib = _libc.mallinfo2(), 2**20
    print(
        f"{phase:8s} peak {_status_mib('VmHWM'):.0f} MiB  RSS {_status_mib('VmRSS'):.0f} MiB  "
        f"arenas {info.arena / mib:.0f} (in use {info.uordblks / mib:.0f}, free {info.fordblks / mib:.0f})  "
        f"mmapped {info.hblkhd / mib:.0f} MiB",
        flush=True,
    )
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    parser.add_argument("--no-compilation-cache", action="store_true")
    args = parser.parse_args()

    import jax.numpy as jnp

    jnp.ones(3).block_until_ready()
    report("jax")
    import rz
    from rz.model_files import gemma3_270m_path, smollm2_135m_path

    path = {"smollm2": smollm2_135m_path, "gemma3": gemma3_270m_path}[args.model]()
    llm = rz.LLM(path, n_ctx=768, max_batch=1, compilation_cache=not args.no_compilation_cache)
    report("loaded")
    rng = np.random.default_rng(0)
    for phase, n_prompt, n_gen in (("pp512", 512, 1), ("tg128", 16, 128)):
        prompt = rng.integers(100, 40000, n_prompt).tolist()
        llm.generate(prompt, max_tokens=n_gen, temperature=0.0, ignore_eos=True, cache_prompt=False)
        report(phase)


if __name__ == "__main__":
    main()
