"""Issue 17's scoring workload: rz.LLM.score of a passage's first 1,100 tokens (every position's
logits) against llama.cpp evaluating the same tokens with all logits (llama-cpp-python's Llama,
logits_all=True, Llama.eval), the target being at most 1.5x llama.cpp's time. The engines are
interleaved round by round, the first round (compilation, first touches) is not counted, and the
best round of each is compared. Both engines get the same n_ctx; llama.cpp runs without its extra
(REPACK/AMX) buffer types where they crash (rz.bench.llamacpp_setup). The share of positions where
both engines rank the same token first is recorded beside the times, as a check that they computed
the same thing.
"""

import time
from pathlib import Path
from typing import Callable

import numpy as np

from rz.bench.errors import BenchError
from rz.bench.passage import PASSAGE

TARGET_RATIO = 1.5  # issue 17: scoring at most 1.5x llama.cpp's time
LLAMA_CPP_N_BATCH = 512


def measure(models: dict[str, Path], n_tokens: int, n_ctx: int, reps: int, threads: int,
            progress: Callable[[str], None]) -> dict:
    """Per model, the seconds of every counted round of each engine, the best of each and their ratio."""
    import llama_cpp

    import rz
    from rz.bench.llamacpp_setup import use_safe_defaults

    if not 1 <= n_tokens <= n_ctx:
        raise BenchError(f"--tokens must be between 1 and --n-ctx ({n_ctx}), got {n_tokens}")
    use_safe_defaults()
    result = {"tokens": n_tokens, "n_ctx": n_ctx, "reps": reps, "threads": threads, "llama_cpp_n_batch": LLAMA_CPP_N_BATCH,
              "target_ratio": TARGET_RATIO, "models": []}
    for name, path in models.items():
        llm = rz.LLM(path, n_ctx=n_ctx, max_batch=1)
        tokens = llm.tokenize(PASSAGE)[:n_tokens]
        if len(tokens) < n_tokens:
            raise BenchError(f"the passage is {len(tokens)} tokens for {name}: ask for at most that many with --tokens")
        oracle = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=LLAMA_CPP_N_BATCH, logits_all=True,
                                 n_threads=threads, n_threads_batch=threads, verbose=False)
        seconds = {"rz": [], "llama.cpp": []}
        try:
            for rep in range(reps + 1):
                started = time.perf_counter()
                logits = llm.score(tokens)
                ours = time.perf_counter() - started
                oracle.reset()
                started = time.perf_counter()
                oracle.eval(tokens)
                theirs = time.perf_counter() - started
                if rep:
                    seconds["rz"].append(ours)
                    seconds["llama.cpp"].append(theirs)
                progress(f"{name} round {rep}{'' if rep else ' (not counted)'}: rz {ours:.2f} s, llama.cpp {theirs:.2f} s")
            same_first = float(np.mean(logits.argmax(-1) == oracle.scores[:n_tokens].argmax(-1)))
        finally:
            oracle.close()
        del llm, logits
        best = {engine: min(values) for engine, values in seconds.items()}
        result["models"].append({"model": name, "path": str(path), "seconds": seconds, "best_s": best,
                                 "ratio": best["rz"] / best["llama.cpp"], "same_top_token": same_first})
    return result


def table(result: dict) -> str:
    """The best times per model as a markdown table, with rz's ratio to llama.cpp against the target."""
    lines = [f"llm.score of {result['tokens']} tokens against llama.cpp's eval with all logits, best of {result['reps']} "
             f"(target: at most {result['target_ratio']}x)", "",
             "| model | rz, s | llama.cpp, s | rz / llama.cpp | within target | same top token |", "|---|---:|---:|---:|---|---:|"]
    for entry in result["models"]:
        lines.append(f"| {entry['model']} | {entry['best_s']['rz']:.2f} | {entry['best_s']['llama.cpp']:.2f} | "
                     f"{entry['ratio']:.2f} | {'yes' if entry['ratio'] <= result['target_ratio'] else 'no'} | "
                     f"{entry['same_top_token']:.1%} |")
    return "\n".join(lines)
