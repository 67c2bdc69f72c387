"""Speculative decoding at batch 1, both real models: what a verify call costs against a decode step,
and decode tok/s of rz plain, rz with prompt lookup (speculative="ngram"), llama.cpp plain and
llama.cpp's prompt lookup (llama-cpp-python's LlamaPromptLookupDecoding), engines interleaved.

    flock -x /tmp/rz-cpu.lock python benchmarks/speculative.py [--reps 2] [--max-tokens 128]

Workloads: input-grounded (rewrite a ~500-token passage as it is) and free generation (a story).
Greedy, chat-formatted; tok/s counts the tokens after the first over the time after the first.
llama.cpp runs without its extra (REPACK/AMX) buffer types (rz.bench.llamacpp_setup).
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import rz
from rz import steps
from rz.bench.llamacpp_setup import use_safe_defaults
from rz.buckets import VERIFY_WIDTHS
from rz.model_files import gemma3_270m_path, smollm2_135m_path
from rz.request import SamplingParams
from rz.sampling import SamplerState, SamplingTensors

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))
from passage import PASSAGE  # noqa: E402

MODELS = {"SmolLM2-135M Q4_1": smollm2_135m_path, "Gemma 3 270M Q4_K_M": gemma3_270m_path}
GROUNDED = "Rewrite the following passage exactly as it is, word for word:\n\n{passage}"
FREE = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def verify_costs(llm, depth: int = 512, reps: int = 20) -> dict[str, float]:
    """Milliseconds of one decode step and of a verify call of each width at batch 1, `depth` tokens in."""
    model, static = llm.model, {"family": llm.model.family, "cfg": llm.model.cfg}
    freq = model.family.rope_freq_factors(model.weights)
    params = SamplingParams(temperature=0)
    tensors = SamplingTensors.from_params([params])
    state = SamplerState.create([params], [[1]])
    cache = model.init_cache(1, 1024)
    times = {}

    def clock(name, call):
        nonlocal cache, state
        for rep in range(reps + 2):  # two warm-up calls (compilation)
            started = time.perf_counter()
            cache, state = call(cache, state)
            jax.block_until_ready(cache)
            if rep >= 2:
                times.setdefault(name, []).append(time.perf_counter() - started)

    def decode(cache, state):
        out = steps.decode(model.weights, cache, jnp.asarray([1], jnp.int32), jnp.asarray([depth], jnp.int32), tensors, state,
                           **static, n_ctx=1024, n_top=0, n_steps=1)
        jax.device_get(out[0].tokens)
        return out[1], out[2]

    clock("decode step", decode)
    for width in VERIFY_WIDTHS:
        positions = jnp.arange(depth, depth + width, dtype=jnp.int32)[None]
        tables = steps.chunk_rope_tables(freq, positions, cfg=model.cfg)

        def verify(cache, state, positions=positions, tables=tables, width=width):
            out = steps.verify(model.weights, cache, jnp.ones((1, width), jnp.int32), positions, tables, tensors, state,
                               **static, n_top=0)
            jax.device_get(out[1])
            return out[2], out[3]

        clock(f"verify width {width}", verify)
    return {name: 1000 * float(np.median(values)) for name, values in times.items()}


def rz_run(llm, prompt_ids, max_tokens, speculative):
    engine_before = llm._current
    drafted = engine_before.n_drafted if engine_before else 0
    accepted = engine_before.n_accepted if engine_before else 0
    done = llm.generate(prompt_ids, max_tokens=max_tokens, temperature=0, speculative=speculative)
    engine = llm._current
    n = len(done.token_ids) - 1
    return n / done.timings["decode_seconds"], done.token_ids, engine.n_drafted - drafted, engine.n_accepted - accepted


def llamacpp_run(model, prompt_ids, max_tokens):
    model.reset()
    first = None
    tokens = []
    for token in model.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        if first is None:
            first = time.perf_counter()
        tokens.append(token)
        if token == model.token_eos() or len(tokens) >= max_tokens:
            break
    return (len(tokens) - 1) / (time.perf_counter() - first), tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    use_safe_defaults()
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    for name, path in MODELS.items():
        llm = rz.LLM(path(), n_ctx=2048, max_batch=1)
        costs = verify_costs(llm)
        base = costs["decode step"]
        print(f"\n## {name}\nverify cost at batch 1, depth 512 (ms, x decode step): "
              + ", ".join(f"{k} {v:.2f} ({v / base:.2f}x)" for k, v in costs.items()))
        common = dict(model_path=str(path()), n_ctx=2048, n_threads=2, n_threads_batch=2, verbose=False)
        plain_cpp = llama_cpp.Llama(**common)
        # Its draft verification reads the logits of every position fed.
        lookup_cpp = llama_cpp.Llama(**common, logits_all=True, draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))
        for workload, text in (("input-grounded", GROUNDED.format(passage=PASSAGE[:2400])), ("free", FREE)):
            ids = llm.chat_prompt_ids([{"role": "user", "content": text}])
            rates = {key: [] for key in ("rz plain", "rz ngram", "llama.cpp plain", "llama.cpp prompt lookup")}
            drafted = accepted = 0
            for _ in range(args.reps):
                rate, plain_ids, _, _ = rz_run(llm, ids, args.max_tokens, None)
                rates["rz plain"].append(rate)
                rate, spec_ids, d, a = rz_run(llm, ids, args.max_tokens, "ngram")
                rates["rz ngram"].append(rate)
                drafted, accepted = drafted + d, accepted + a
                rates["llama.cpp plain"].append(llamacpp_run(plain_cpp, ids, args.max_tokens)[0])
                rates["llama.cpp prompt lookup"].append(llamacpp_run(lookup_cpp, ids, args.max_tokens)[0])
            same = "same tokens" if spec_ids == plain_ids else "tokens differ"
            print(f"{workload} (prompt {len(ids)} tokens, {len(plain_ids)} generated; {same}; "
                  f"rz drafts kept {accepted}/{drafted} = {accepted / max(drafted, 1):.0%})")
            plain = np.median(rates["rz plain"])
            for key, values in rates.items():
                print(f"  {key:26s} {np.median(values):7.1f} tok/s  ({np.median(values) / plain:.2f}x rz plain)")
        del plain_cpp, lookup_cpp
    return 0


if __name__ == "__main__":
    sys.exit(main())
