"""Speculative decoding at batch 1 (issue 20): what a verify call costs against a decode step, and
decode tok/s of rz plain, rz with each proposer, llama.cpp plain and llama.cpp's prompt lookup
(llama-cpp-python's LlamaPromptLookupDecoding), engines interleaved on the same token ids.

Workloads: three input-grounded ones (rewrite a ~500-token passage word for word, asked before it
or after it; return a ~500-token Python function with one change) and free generation (a story). Greedy, chat-formatted; tok/s
counts the tokens after the first over the time after the first. Every verify and draft shape is
compiled before the first round, which is not counted either. llama.cpp runs without its extra
(REPACK/AMX) buffer types (rz.bench.llamacpp_setup).
"""

import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rz.bench.passage import CODE, PASSAGE
from rz.buckets import VERIFY_WIDTHS

WORKLOADS = {
    "input-grounded": "Rewrite the following passage exactly as it is, word for word:\n\n" + PASSAGE[:2400],
    # The passage, then the request: SmolLM2 copies it so (asked first, it rewrites it).
    "passage first": PASSAGE[:2400] + "\n\nRepeat the passage above word for word.",
    "code edit": "Return this Python function with one change: rename the parameter `max_stops` to `stop_limit` "
    "everywhere. Reply with the whole function and nothing else.\n\n```python\n" + CODE + "```",
    "free": "Write a long story about a lighthouse keeper who finds a message in a bottle.",
}
# Draft tokens per llama.cpp prompt-lookup call: llama-cpp-python's default.
LLAMACPP_LOOKUP_DRAFTS = 10


def verify_costs(llm, depth: int = 512, reps: int = 20) -> dict[str, float]:
    """Milliseconds (median) of one decode step and of a verify call of each width at batch 1, `depth` tokens in,
    and of the draft model's call of each width's drafts if llm has one."""
    from rz import steps
    from rz.request import SamplingParams
    from rz.sampling import SamplerState, SamplingTensors

    model, static = llm.model, {"family": llm.model.family, "cfg": llm.model.cfg}
    freq = model.family.rope_freq_factors(model.weights)
    params = SamplingParams(temperature=0)
    tensors = SamplingTensors.from_params([params])
    state = SamplerState.create([params], [[1]])
    cache = model.init_cache(1, 2 * depth)
    # The cache holds `depth` tokens, so that each call attends over them as a stream's would: over
    # an empty cache the attention kernels skip every slot, and a call costs its matmuls alone.
    prompt_positions = jnp.arange(depth, dtype=jnp.int32)[None]
    _, cache = steps.prefill(model.weights, cache, jnp.ones((1, depth), jnp.int32), prompt_positions,
                             steps.chunk_rope_tables(freq, prompt_positions, cfg=model.cfg),
                             jnp.asarray([depth - 1], jnp.int32), **static)
    times: dict[str, list[float]] = {}

    def clock(name, call):
        nonlocal cache, state
        for rep in range(reps + 2):  # two warm-up calls (compilation)
            started = time.perf_counter()
            cache, state = call(cache, state)
            if rep >= 2:
                times.setdefault(name, []).append(time.perf_counter() - started)

    def decode(cache, state):
        out = steps.decode(model.weights, cache, jnp.asarray([1], jnp.int32), jnp.asarray([depth], jnp.int32), tensors,
                           state, None, **static, n_ctx=2 * depth, n_top=0, n_steps=1)
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
    if llm.draft_model is not None:
        # The draft model's cache takes the target's place in clock's loop; the sampler state is read only.
        draft = llm.draft_model
        cache = draft.init_cache(1, 2 * depth)
        for width in VERIFY_WIDTHS:
            def drafting(cache, state, n_drafts=width - 1):
                out = steps.draft(draft.weights, cache, jnp.asarray([1], jnp.int32), jnp.asarray([depth], jnp.int32), tensors,
                                  state, family=draft.family, cfg=draft.cfg, n_ctx=2 * depth, n_drafts=n_drafts)
                jax.device_get(out[0])
                return out[2], state

            clock(f"draft model, {width - 1} tokens", drafting)
    return {name: 1000 * float(np.median(values)) for name, values in times.items()}


def hindsight_bound(prompt_ids, output_ids, relative_cost: dict[int, float]) -> float:
    """The most prompt lookup could speed up plain decoding of output_ids, judged in hindsight: tokens
    after the first per decode step, on the cheapest schedule that produces them from plain decode
    steps (cost 1 a token) and verify calls (relative_cost[width] each, in decode steps) that keep
    the drafts rz.speculative.NgramIndex proposes there while they match what followed. No policy
    for when and how much to draft gains more from these drafts at these costs: when it falls
    short of a target, the text (how much of it repeats its context) is what limits."""
    from rz.speculative import NgramIndex

    n = len(output_ids)
    if n < 2:
        return 1.0
    index = NgramIndex().extend([*prompt_ids, output_ids[0]])
    best = [float("inf")] * (n + 1)  # best[i]: the cheapest schedule that has produced output_ids[:i]
    best[1] = 0.0
    for i in range(1, n):
        best[i + 1] = min(best[i + 1], best[i] + 1)
        for width, cost in relative_cost.items():
            drafts = index.propose(width - 1)
            if drafts:
                kept = next((k for k, d in enumerate(drafts) if i + k >= n or d != output_ids[i + k]), len(drafts))
                end = min(n, i + 1 + kept)
                best[end] = min(best[end], best[i] + cost)
        index.extend(output_ids[i : i + 1])
    return (n - 1) / best[n]


def _rz_run(llm, prompt_ids, max_tokens, speculative):
    """(tok/s, token ids, drafted, accepted) of one greedy generation."""
    before = llm._current
    drafted, accepted = (before.n_drafted, before.n_accepted) if before else (0, 0)
    # Every run prefills its whole prompt, as llama.cpp's do: a prefix reused from the run before
    # equals a fresh prefill only to the prefill/decode tolerance, and near ties then part the
    # texts, so that runs with and without speculation would not be comparing the same tokens.
    done = llm.generate(prompt_ids, max_tokens=max_tokens, temperature=0, speculative=speculative, cache_prompt=False)
    engine = llm._current
    rate = (len(done.token_ids) - 1) / done.timings["decode_seconds"]
    return rate, list(done.token_ids), engine.n_drafted - drafted, engine.n_accepted - accepted


def _llamacpp_run(model, prompt_ids, max_tokens, eos):
    """(tok/s, token ids) of one greedy generation through llama-cpp-python's generate loop."""
    model.reset()
    first, tokens = None, []
    for token in model.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        if first is None:
            first = time.perf_counter()
        tokens.append(token)
        if token == eos or len(tokens) >= max_tokens:
            break
    return (len(tokens) - 1) / (time.perf_counter() - first), tokens


def measure(models: dict[str, Path], proposers: tuple[str, ...], reps: int, max_tokens: int, threads: int,
            progress: Callable[[str], None], draft_model: Path | None = None,
            workloads: tuple[str, ...] = tuple(WORKLOADS)) -> dict:
    """Every model's verify costs and, per workload (of WORKLOADS), each engine's median tok/s and
    rz's acceptance; the `draft` proposer drafts with draft_model (left out without one)."""
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    import rz
    from rz.bench.llamacpp_setup import use_safe_defaults

    use_safe_defaults()
    result = {"models": []}
    for name, path in models.items():
        progress(f"{name}: verify costs")
        llm = rz.LLM(path, n_ctx=2048, max_batch=1, draft_model=draft_model)
        entry = {"model": name, "path": str(path), "verify_ms": verify_costs(llm), "workloads": []}
        if draft_model is not None:
            entry["draft_model"] = str(draft_model)
        _rz_run(llm, llm.tokenize("Hello"), 2, "off")  # the engine, whose speculation shapes compile now
        for proposer in proposers:
            llm._current.compile_speculation(1, proposer)
        common = dict(model_path=str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        plain_cpp = llama_cpp.Llama(**common)
        # Its draft verification reads the logits of every position fed.
        lookup_cpp = llama_cpp.Llama(**common, logits_all=True,
                                     draft_model=LlamaPromptLookupDecoding(num_pred_tokens=LLAMACPP_LOOKUP_DRAFTS))
        for workload in workloads:
            text = WORKLOADS[workload]
            progress(f"{name}: {workload}")
            ids = llm.chat_prompt_ids([{"role": "user", "content": text}])
            runs = {"rz plain": [], **{f"rz {p}": [] for p in proposers}, "llama.cpp plain": [], "llama.cpp prompt lookup": []}
            counts = {p: [0, 0] for p in proposers}
            same = {p: True for p in proposers}
            for rep in range(reps + 1):  # the first round warms up (compilation, caches) and is not counted
                rate, plain_ids, _, _ = _rz_run(llm, ids, max_tokens, "off")
                rates = {"rz plain": rate}
                for proposer in proposers:
                    rates[f"rz {proposer}"], spec_ids, drafted, accepted = _rz_run(llm, ids, max_tokens, proposer)
                    if rep:
                        counts[proposer][0] += drafted
                        counts[proposer][1] += accepted
                    same[proposer] &= spec_ids == plain_ids
                rates["llama.cpp plain"] = _llamacpp_run(plain_cpp, ids, max_tokens, plain_cpp.token_eos())[0]
                rates["llama.cpp prompt lookup"] = _llamacpp_run(lookup_cpp, ids, max_tokens, lookup_cpp.token_eos())[0]
                if rep:
                    for key, rate in rates.items():
                        runs[key].append(rate)
            entry["workloads"].append({
                "workload": workload, "prompt_tokens": len(ids), "generated": len(plain_ids),
                "tok_per_s": {key: float(np.median(values)) for key, values in runs.items()},
                "drafted": {p: c[0] for p, c in counts.items()}, "accepted": {p: c[1] for p, c in counts.items()},
                "same_tokens_as_plain": same,
                "ngram_hindsight_bound": hindsight_bound(ids, plain_ids, {
                    width: entry["verify_ms"][f"verify width {width}"] / entry["verify_ms"]["decode step"]
                    for width in VERIFY_WIDTHS
                }),
            })
        del plain_cpp, lookup_cpp, llm
        result["models"].append(entry)
    return result


def table(result: dict) -> str:
    """The result as markdown: verify costs, then tok/s against rz plain per model and workload."""
    lines = []
    for entry in result["models"]:
        costs = entry["verify_ms"]
        base = costs["decode step"]
        lines += [f"## {entry['model']}", ""]
        if "draft_model" in entry:
            lines += [f"Draft model (the draft proposer): {Path(entry['draft_model']).name}", ""]
        lines += ["| call (batch 1, depth 512) | ms | × decode step |", "|---|---:|---:|"]
        lines += [f"| {call} | {ms:.2f} | {ms / base:.2f} |" for call, ms in costs.items()]
        for work in entry["workloads"]:
            rates = work["tok_per_s"]
            plain = rates["rz plain"]
            lines += ["", f"### {work['workload']} (prompt {work['prompt_tokens']} tokens, {work['generated']} generated)", "",
                      "| engine | tok/s | × rz plain | drafts kept | same tokens as plain |", "|---|---:|---:|---:|---|"]
            for engine, rate in rates.items():
                proposer = engine.removeprefix("rz ")
                kept, same = "", ""
                if proposer in work["drafted"]:
                    drafted, accepted = work["drafted"][proposer], work["accepted"][proposer]
                    kept = f"{accepted}/{drafted} ({accepted / max(drafted, 1):.0%})"
                    same = "yes" if work["same_tokens_as_plain"][proposer] else "no"
                lines.append(f"| {engine} | {rate:.1f} | {rate / plain:.2f} | {kept} | {same} |")
            if "ngram_hindsight_bound" in work:
                lines += ["", f"Prompt lookup's hindsight bound on rz plain's text: {work['ngram_hindsight_bound']:.2f}× "
                          "(its drafts on the best schedule, at the verify costs above)"]
        lines.append("")
    return "\n".join(lines)
