"""Issue 17's shared-system-prompt workload: 8 clients send the same ~1,000-token system prompt
with different questions. How many prompt tokens rz computes (Engine.prompt_tokens_computed)
against the ~1,000 + unique parts a shared prefix needs, with prefix reuse and without
(cache_prompt=False), and the time to every client's first token.

The 8 requests go into rz.LLM.generate together, as 8 clients arriving at once would reach the
engine loop: admitted one after another, each copying the system prompt from a row that holds
it (a running one), then decoded as one batch. Each model runs a first pass to compile.

    flock -x /tmp/rz-cpu.lock env PYTHONPATH=$PWD python benchmarks/shared_system_prompt.py --out benchmarks/results/shared-system-prompt-session11.json
"""

import argparse
import json
import time

import rz
from rz.bench.chat import conversation
from rz.bench.environment import cpu_info
from rz.model_files import gemma3_270m_path, smollm2_135m_path

N_CLIENTS = 8
SYSTEM_TOKENS = 1000
N_CTX = 2048


def prompts(llm) -> list[list[int]]:
    """8 chats: one system prompt of ~SYSTEM_TOKENS tokens, then a different question each."""
    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text, add_bos=False)

    # The chat workload's prose, as the first user message of a one-turn conversation.
    first_message = conversation(tokenize, lambda messages: tokenize(messages[0]["content"]), 1, SYSTEM_TOKENS, 1)[0]
    system = llm.detokenize(first_message)
    questions = [f"Question {i + 1}: what does the {thing} do in the story, and why?" for i, thing in enumerate(
        ("river", "miller", "heron", "owl", "bridge", "market town", "grain store", "sunflower"))]
    return [llm.chat_prompt_ids([{"role": "system", "content": system}, {"role": "user", "content": q}]) for q in questions]


def run(llm, ids: list[list[int]], cache_prompt: bool) -> dict:
    engine = llm._scheduler(len(ids)).engine
    engine.blocks.clear_cache()  # each pass starts from an empty cache
    computed = engine.prompt_tokens_computed
    started = time.perf_counter()
    completions = llm.generate(ids, max_tokens=8, temperature=0.0, ignore_eos=True, cache_prompt=cache_prompt)
    wall = time.perf_counter() - started
    return {
        "prompt_tokens": sum(map(len, ids)),
        "prompt_tokens_computed": engine.prompt_tokens_computed - computed,
        "cached_tokens": [c.usage["cached_tokens"] for c in completions],
        "ttft_s": [round(c.timings["time_to_first_token_seconds"], 3) for c in completions],
        "wall_s": round(wall, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3")
    parser.add_argument("--out")
    args = parser.parse_args()
    paths = {"smollm2": smollm2_135m_path, "gemma3": gemma3_270m_path}
    result = {"workload": f"{N_CLIENTS} chats, one ~{SYSTEM_TOKENS}-token system prompt, different questions, "
                          f"8 tokens each, n_ctx {N_CTX}, one rz.LLM.generate batch", "cpu": cpu_info(), "models": {}}
    for name in args.models.split(","):
        llm = rz.LLM(paths[name](), n_ctx=N_CTX, max_batch=N_CLIENTS)
        ids = prompts(llm)
        shortest = min(map(len, ids))
        common = next(k for k in range(shortest + 1) if k == shortest or len({p[k] for p in ids}) > 1)
        runs = {}
        for cache_prompt in (True, False, True, False):  # the first two compile
            runs[f"cache_prompt={cache_prompt}"] = run(llm, ids, cache_prompt)
        result["models"][name] = {"shared_prefix_tokens": common, "unique_tokens": sum(len(p) - common for p in ids), **runs}
        print(name, json.dumps(result["models"][name]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
