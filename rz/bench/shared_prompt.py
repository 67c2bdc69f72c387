"""Issue 17's shared-system-prompt workload: clients send the same ~1,000-token system prompt with
different questions. How many prompt tokens each engine computes, against the shared prefix once
plus every client's unique part (the target), and each client's time to its first token.

rz gets every client's prompt in one rz.LLM.generate call, as clients arriving at once reach its
engine loop: admitted one after another, each mapping the cached blocks of the system prompt
that an earlier one committed (full blocks, and a copy of the block after them that holds the
system prompt's last tokens and an earlier client's question: rz.kv_blocks), with
prefix reuse on and, as the reference, off (cache_prompt=False). llama.cpp serves them one after
another on one sequence, reusing the prefix each prompt shares with the previous one, as
llama-cpp-python's Llama and a one-slot llama-server do (its context's default full-size
sliding-window cache keeps Gemma 3's whole prefix reusable); a client's time to its first token
there includes the clients served before it. Every engine starts each round from an empty
cache; rounds interleave the engines, and the first round (compilation) is not counted.
"""

import time
from pathlib import Path
from typing import Callable

import numpy as np

from rz.bench.chat import LlamaCppChat, conversation
from rz.bench.engines.base import EngineSettings
from rz.bench.errors import BenchError

# One question per client, each about a different thing in the chat workload's prose.
_SUBJECTS = ("river", "miller", "heron", "owl", "bridge", "market town", "grain store", "sunflower",
             "willow", "blue door", "loft", "meadow", "oven", "traveller", "bean garden", "wind")
RZ_REUSE, RZ_NO_REUSE, LLAMA_CPP = "rz", "rz, no reuse", "llama.cpp"


def client_prompts(llm, n_clients: int, system_tokens: int) -> list[list[int]]:
    """Chat prompts of n_clients clients: one system prompt of about system_tokens tokens, then a different question each."""
    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text, add_bos=False)

    # The chat workload's prose, as the first user message of a one-turn conversation.
    system = llm.detokenize(conversation(tokenize, lambda messages: tokenize(messages[0]["content"]), 1, system_tokens, 1)[0])
    return [llm.chat_prompt_ids([{"role": "system", "content": system},
                                 {"role": "user", "content": f"Question {i + 1}: what does the {subject} do in the story, and why?"}])
            for i, subject in enumerate(_SUBJECTS[:n_clients])]


def shared_prefix(prompts: list[list[int]]) -> int:
    """The length of the prefix every prompt starts with."""
    shortest = min(map(len, prompts))
    return next((k for k in range(shortest) if len({p[k] for p in prompts}) > 1), shortest)


def target_tokens(prompts: list[list[int]]) -> int:
    """What a perfect prefix cache computes: the shared prefix once, then every prompt's unique part."""
    common = shared_prefix(prompts)
    return common + sum(len(p) - common for p in prompts)


def _rz_round(llm, prompts: list[list[int]], cache_prompt: bool) -> dict:
    """All clients' first tokens in one generate call, from an empty prefix cache."""
    engine = llm._scheduler(len(prompts)).engine
    engine.blocks.clear_cache()
    computed = engine.prompt_tokens_computed
    started = time.perf_counter()
    completions = llm.generate(prompts, max_tokens=1, temperature=0.0, ignore_eos=True, cache_prompt=cache_prompt)
    seconds = time.perf_counter() - started
    return {"computed": engine.prompt_tokens_computed - computed, "seconds": seconds,
            "reused": [c.usage["cached_tokens"] for c in completions],
            "ttft_s": [c.timings["time_to_first_token_seconds"] for c in completions]}


def _llama_cpp_round(oracle: LlamaCppChat, prompts: list[list[int]]) -> dict:
    """The clients' first tokens one after another on one sequence, from an empty cache."""
    oracle.held = []
    reused, ttft = [], []
    started = time.perf_counter()
    for ids in prompts:
        reused.append(oracle.first_token(ids))
        ttft.append(time.perf_counter() - started)
    return {"computed": sum(len(p) for p in prompts) - sum(reused), "seconds": ttft[-1], "reused": reused, "ttft_s": ttft}


def measure(models: dict[str, Path], n_clients: int, system_tokens: int, n_ctx: int, threads: int,
            engines: tuple[str, ...], reps: int, progress: Callable[[str], None]) -> dict:
    """Per model, each engine's prompt tokens computed and, median over `reps` rounds, seconds to
    every client's first token and to each one's."""
    import rz
    from rz.bench.llamacpp_setup import use_safe_defaults

    if not 1 <= n_clients <= len(_SUBJECTS):
        raise BenchError(f"--clients must be between 1 and {len(_SUBJECTS)}, got {n_clients}")
    use_safe_defaults()
    result = {"clients": n_clients, "system_tokens": system_tokens, "n_ctx": n_ctx, "threads": threads, "reps": reps,
              "models": []}
    for name, path in models.items():
        llm = rz.LLM(path, n_ctx=n_ctx, max_batch=n_clients)
        prompts = client_prompts(llm, n_clients, system_tokens)
        if max(map(len, prompts)) + 1 > n_ctx:
            raise BenchError(f"the longest prompt ({max(map(len, prompts))} tokens) does not fit --n-ctx {n_ctx}")
        rounds = {}
        if "rz" in engines:
            rounds[RZ_REUSE] = lambda: _rz_round(llm, prompts, cache_prompt=True)
            rounds[RZ_NO_REUSE] = lambda: _rz_round(llm, prompts, cache_prompt=False)
        oracle = None
        if "llama.cpp" in engines:
            oracle = LlamaCppChat(EngineSettings(model_path=path, threads=threads, n_ctx=n_ctx))
            rounds[LLAMA_CPP] = lambda: _llama_cpp_round(oracle, prompts)
        runs = {engine: [] for engine in rounds}
        try:
            for rep in range(reps + 1):
                for engine, run in rounds.items():
                    runs[engine].append(run())
                progress(f"{name} round {rep}: " + ", ".join(
                    f"{engine} {r[-1]['computed']} tokens in {r[-1]['seconds']:.2f} s" for engine, r in runs.items()))
        finally:
            if oracle is not None:
                oracle.engine.close()
        del llm
        result["models"].append({
            "model": name, "path": str(path), "prompt_tokens": [len(p) for p in prompts],
            "shared_prefix_tokens": shared_prefix(prompts), "target_tokens": target_tokens(prompts),
            "engines": {engine: _summary(measured[1:]) for engine, measured in runs.items()},
        })
    return result


def _summary(rounds: list[dict]) -> dict:
    """The last round's token counts (every round computes the same) and median times over the rounds."""
    return {"computed": rounds[-1]["computed"], "reused": rounds[-1]["reused"],
            "seconds": float(np.median([r["seconds"] for r in rounds])),
            "ttft_s": [float(t) for t in np.median([r["ttft_s"] for r in rounds], axis=0)]}


def table(result: dict) -> str:
    """Per model, a markdown table of tokens computed against the target and the times to first tokens."""
    lines = []
    for entry in result["models"]:
        target, prompts = entry["target_tokens"], entry["prompt_tokens"]
        lines += [f"## {entry['model']}", "",
                  f"{len(prompts)} clients, {sum(prompts)} prompt tokens, {entry['shared_prefix_tokens']} of each shared: "
                  f"the target computes {target} (the shared prefix once, then each client's unique part).", "",
                  "| engine | prompt tokens computed | × target | reused per client | s to every first token | first / last client's TTFT, s |",
                  "|---|---:|---:|---|---:|---:|"]
        for engine, run in entry["engines"].items():
            lines.append(f"| {engine} | {run['computed']} | {run['computed'] / target:.2f} | {', '.join(map(str, run['reused']))} | "
                         f"{run['seconds']:.2f} | {run['ttft_s'][0]:.2f} / {run['ttft_s'][-1]:.2f} |")
        lines.append("")
    return "\n".join(lines)
