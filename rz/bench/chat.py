"""The multi-turn chat workload (issue 17): the time to a turn's first token as the history grows.

Each turn adds a user message of about `user_tokens` tokens of text to the conversation, asks
each engine for one token (its TTFT, measured on the host), then adds a fixed assistant answer
of `answer_tokens` tokens, so that the next turn's prompt extends this one's. Both engines get
the same token ids, rendered once by rz's chat template; engines are interleaved turn by turn.
llama.cpp keeps its previous prompt's KV and decodes only what differs, as llama-cpp-python's
Llama and llama-server's cache_prompt do (the C API, as rz.bench's llama.cpp engine calls it).
With --servers the same chat goes through running servers' OpenAI APIs instead (measure_servers).
"""

import statistics
import time
from pathlib import Path
from typing import Callable

from rz.bench.engines.base import EngineSettings
from rz.bench.engines.llamacpp import LlamaCppEngine
from rz.bench.errors import BenchError
from rz.bench.http import check_url, post_stream

# Plain prose, cycled: each turn takes the next slice, so no two user messages are the same.
_TEXT = (
    "The river bends twice before it reaches the old mill, and the path beside it is lined with "
    "willows that lean over the water. In spring the meadows flood and the herons stand in the "
    "shallows for hours, patient as stones. The miller's house has a blue door and a garden of "
    "beans, onions and tall sunflowers that follow the light from morning to evening. Travellers "
    "stop at the bridge to rest, to ask the way to the market town, or to buy bread still warm "
    "from the oven. Some stay the night in the loft above the grain store, where the wind sings "
    "through the gaps in the boards and the owls keep watch from the rafters."
).split()


def conversation(tokenize: Callable[[str], list[int]], render: Callable[[list[dict]], list[int]], turns: int,
                 user_tokens: int, answer_tokens: int) -> list[list[int]]:
    """The prompt ids of every turn: the chat so far, ending with the turn's user message."""
    messages, prompts, cursor = [], [], 0
    for turn in range(turns):
        words = []
        while len(tokenize(" ".join(words))) < user_tokens:
            words.append(_TEXT[cursor % len(_TEXT)])
            cursor += 1
        messages.append({"role": "user", "content": f"Turn {turn + 1}: " + " ".join(words)})
        prompts.append(render(messages))
        answer = []
        while len(tokenize(" ".join(answer))) < answer_tokens:
            answer.append(_TEXT[cursor % len(_TEXT)])
            cursor += 1
        messages.append({"role": "assistant", "content": " ".join(answer)})
    return prompts


def _prompts(llm, turns: int, user_tokens: int, answer_tokens: int) -> list[list[int]]:
    """The conversation's prompts as `llm` tokenizes and renders them."""
    return conversation(lambda text: llm.tokenize(text, add_bos=False), llm.chat_prompt_ids, turns, user_tokens, answer_tokens)


def measure(model_path: Path, turns: int, user_tokens: int, answer_tokens: int, n_ctx: int, threads: int,
            engines: tuple[str, ...], progress: Callable[[str], None], warm: bool = False, repeats: int = 1) -> dict:
    """Per engine, the TTFT of every turn (seconds) and the prompt lengths. warm: rz compiles
    every shape first (rz.LLM.warm_up), so that no measured turn compiles, as in a warmed-up server.

    repeats: the whole chat runs this many times, each from empty caches, and a turn's TTFT is
    the median of its runs (`ttft_samples_s` holds them all): one run of a turn that takes a
    tenth of a second moves by a third between runs on a busy machine."""
    import rz

    if repeats < 1:
        raise BenchError(f"repeats must be at least 1, got {repeats}")
    llm = rz.LLM(model_path, n_ctx=n_ctx, max_batch=1)
    prompts = _prompts(llm, turns, user_tokens, answer_tokens)
    if warm and "rz" in engines:
        llm.warm_up()
        progress(f"rz warmed up: {len(llm.compilations)} steps compiled")
    if len(prompts[-1]) + 1 > n_ctx:
        raise BenchError(f"the last turn's prompt ({len(prompts[-1])} tokens) does not fit n_ctx {n_ctx}")
    runners = {}
    if "rz" in engines:
        def run_rz(ids):
            completion = llm.generate(ids, max_tokens=1, temperature=0.0)
            return completion.usage.get("cached_tokens", 0)
        runners["rz"] = run_rz
    oracle = None
    if "llama.cpp" in engines:
        oracle = LlamaCppChat(EngineSettings(model_path=model_path, threads=threads, n_ctx=n_ctx))
        runners["llama.cpp"] = oracle.first_token
    samples = {name: [[] for _ in prompts] for name in runners}
    cached_tokens = {name: [] for name in runners}
    try:
        for repeat in range(repeats):
            if repeat:  # the next run starts from empty caches, as the first did
                if "rz" in runners:
                    llm._scheduler(1).engine.blocks.clear_cache()
                if oracle is not None:
                    oracle.held = []
            for turn, ids in enumerate(prompts):
                for name, run in runners.items():
                    started = time.perf_counter()
                    cached = run(ids)
                    samples[name][turn].append(time.perf_counter() - started)
                    if not repeat:
                        cached_tokens[name].append(cached)
                    elif cached != cached_tokens[name][turn]:
                        raise BenchError(f"run {repeat + 1} of turn {turn + 1} reused {cached} tokens with {name}, the "
                                         f"first run {cached_tokens[name][turn]}: its caches were not emptied between runs")
                progress(f"run {repeat + 1}, turn {turn + 1}: {len(ids)} tokens, " + ", ".join(
                    f"{name} {times[turn][-1]:.3f} s" for name, times in samples.items()))
    finally:
        if oracle is not None:
            oracle.engine.close()
    return {"model": model_path.name, "n_ctx": n_ctx, "threads": threads, "warm": warm, "repeats": repeats,
            "prompt_tokens": [len(p) for p in prompts],
            "ttft_s": {name: [statistics.median(turn) for turn in per_turn] for name, per_turn in samples.items()},
            "ttft_samples_s": samples, "cached_tokens": cached_tokens}


def measure_servers(model_path: Path, servers: dict[str, str], turns: int, user_tokens: int, answer_tokens: int,
                    progress: Callable[[str], None], timeout_s: float = 600.0) -> dict:
    """The same chat through running servers (name -> http URL): each turn one streamed, greedy
    /v1/completions request of one token, its prompt as token ids (rz's server and llama-server
    take them; both then see the same tokens), with cache_prompt on (llama-server's default).
    TTFT is the arrival of the first streamed event that carries a choice, timed here."""
    import rz

    for name, url in servers.items():
        check_url(url, name)
    prompts = _prompts(rz.LLM(model_path, max_batch=1, compilation_cache=False), turns, user_tokens, answer_tokens)
    result = {"model": model_path.name, "servers": dict(servers), "prompt_tokens": [len(p) for p in prompts],
              "ttft_s": {name: [] for name in servers}, "cached_tokens": {name: [] for name in servers}}
    for turn, ids in enumerate(prompts, 1):
        for name, url in servers.items():
            ttft, cached = _first_event(url, ids, timeout_s)
            result["ttft_s"][name].append(ttft)
            result["cached_tokens"][name].append(cached)
        progress(f"turn {turn}: {len(ids)} tokens, " + ", ".join(
            f"{name} {times[-1]:.3f} s" for name, times in result["ttft_s"].items()))
    return result


def _first_event(url: str, ids: list[int], timeout_s: float) -> tuple[float, int | None]:
    """(seconds to the first event with a choice, the prompt tokens the server reports reusing:
    rz's usage.prompt_tokens_details.cached_tokens, or llama-server's prompt length less
    timings.prompt_n; None if it reports neither)."""
    body = {"prompt": ids, "max_tokens": 1, "temperature": 0.0, "stream": True, "cache_prompt": True,
            "stream_options": {"include_usage": True}}
    started, first, cached = time.perf_counter(), None, None
    for arrived, event in post_stream(url + "/v1/completions", body, timeout=timeout_s):
        if first is None and event.get("choices"):
            first = arrived
        details = (event.get("usage") or {}).get("prompt_tokens_details") or {}
        if "cached_tokens" in details:
            cached = details["cached_tokens"]
        elif (event.get("timings") or {}).get("prompt_n") is not None:
            cached = len(ids) - event["timings"]["prompt_n"]
    if first is None:
        raise BenchError(f"{url} streamed no choice for a {len(ids)}-token prompt")
    return first - started, cached


class LlamaCppChat:
    """llama.cpp's first token for a prompt, reusing the KV of the prefix it shares with the last one."""

    def __init__(self, settings: EngineSettings):
        self.engine = LlamaCppEngine(settings)
        self.engine.preflight()
        self.engine.load()
        self.held: list[int] = []

    def first_token(self, ids: list[int]) -> int:
        """Decode what follows the held prefix (at least the last token) and sample one token: the tokens reused."""
        engine, lib = self.engine, self.engine._lib
        ctx, batch, sampler = engine._context(1)
        n_reused = 0
        while n_reused < min(len(self.held), len(ids) - 1) and self.held[n_reused] == ids[n_reused]:
            n_reused += 1
        lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), 0, n_reused, -1)
        engine._decode_prompt(ctx, batch, ids[n_reused:], 0, n_reused, want_logits=True)
        lib.llama_sampler_sample(sampler, ctx, -1)
        self.held = list(ids)
        return n_reused


def table(result: dict) -> str:
    """The per-turn TTFTs as a markdown table, with each engine's ratio to the first."""
    names = list(result["ttft_s"])
    header = "| turn | prompt tokens | " + " | ".join(f"{name} TTFT, s" for name in names)
    if len(names) > 1:
        header += f" | {names[0]} / {names[1]}"
    lines = [header + " |", "|" + "---:|" * header.count("|")]
    for index, n_prompt in enumerate(result["prompt_tokens"]):
        row = [str(index + 1), str(n_prompt)] + [f"{result['ttft_s'][name][index]:.3f}" for name in names]
        if len(names) > 1:
            row.append(f"{result['ttft_s'][names[0]][index] / result['ttft_s'][names[1]][index]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
