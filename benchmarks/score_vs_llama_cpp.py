"""llm.score of 1,100 tokens against llama.cpp evaluating the same tokens with all logits (issue 17's
scoring target: at most 1.5x), the engines interleaved in one process, best of 3 after a warm-up.

    python benchmarks/score_vs_llama_cpp.py [--tokens 1100] [--threads 2]

rz runs with rz.LLM's defaults (n_ctx 4096, f16 cache); llama.cpp with n_ctx 2048, n_batch 512, its
default cache, loaded through rz.bench.llamacpp_setup (no REPACK/AMX buffers on an AMX CPU).
"""

import argparse
import json
import time

from rz.bench.passage import PASSAGE


def main() -> None:
    import llama_cpp

    import rz
    from rz.bench.llamacpp_setup import use_safe_defaults
    from rz.model_files import gemma3_270m_path, smollm2_135m_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    use_safe_defaults()
    for name, path in (("smollm2-135m", smollm2_135m_path()), ("gemma3-270m", gemma3_270m_path())):
        llm = rz.LLM(path)
        tokens = llm.tokenize(PASSAGE)[: args.tokens]
        llm.score(tokens)  # compiles
        oracle = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=512, logits_all=True, n_threads=args.threads, verbose=False)
        ours, theirs = [], []
        for _ in range(3):
            started = time.perf_counter()
            llm.score(tokens)
            ours.append(time.perf_counter() - started)
            oracle.reset()
            started = time.perf_counter()
            oracle.eval(tokens)
            theirs.append(time.perf_counter() - started)
        oracle.close()
        del llm
        print(json.dumps({"model": name, "tokens": len(tokens), "rz_score_s": min(ours), "llama_cpp_eval_s": min(theirs), "ratio": min(ours) / min(theirs)}), flush=True)


if __name__ == "__main__":
    main()
