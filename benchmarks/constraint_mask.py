"""What structured output costs per token at batch 1 on SmolLM2 (issue 19: at most 10% of a decode step).

Three parts, each after a warm-up pass that compiles:
  * the mask on the host: llguidance's allowed-token bitmask for the next token, and its copy to the device;
  * the mask on the device: the sampler with the mask against the sampler without it;
  * end to end: tokens per second of a constrained request (a regex any text of 200 characters
    matches) against the same request unconstrained, on the default engine (4 steps per call,
    calls chained) and on a one-step engine (what a constrained batch runs).

    flock -x /tmp/rz-cpu.lock python benchmarks/constraint_mask.py
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import rz
from rz.engine import Engine
from rz.generation import GenerationRequest
from rz.model_files import smollm2_135m_path
from rz.request import RequestOptions
from rz.sampling import Sampler, SamplerState, SamplingParams, SamplingTensors
from rz.scheduler import Scheduler

N_TOKENS = 200
ANY_TEXT = {"type": "regex", "regex": r"[^\n]{" + str(N_TOKENS * 20) + "}"}  # longer than the tokens can spell
PROMPT = "Write a long story about a lighthouse keeper."


def per_token_seconds(engine: Engine, options: RequestOptions, prompt_ids: tuple[int, ...]) -> float:
    """Decode seconds per token of one request (its first token, which prefill makes, left out)."""
    scheduler = Scheduler(engine)
    sequence = scheduler.add(GenerationRequest(prompt_ids, options))
    list(scheduler.drain())
    assert len(sequence.output_ids) == options.max_tokens, (len(sequence.output_ids), "".join(sequence.text))
    timings = sequence.timings
    return (timings.finished_at - timings.first_token_at) / (len(sequence.output_ids) - 1)


def host_mask_seconds(engine: Engine, prompt_ids: tuple[int, ...]) -> list[float]:
    """The host's part per token: the bitmask of a matcher that follows a generated text, copied to the device."""
    options = RequestOptions.from_flat(max_tokens=N_TOKENS, temperature=0.0, response_format=ANY_TEXT)
    tokens = engine.tokenizer.encode("Once upon a time " * 40, add_bos=False)[:N_TOKENS]
    matcher = engine.new_sequence(GenerationRequest(prompt_ids, options)).constraint
    seconds = []
    for token in tokens:
        started = time.perf_counter()
        jax.block_until_ready(jnp.asarray(engine.vocabulary.masks([matcher])))
        seconds.append(time.perf_counter() - started)
        matcher.advance(token)
    return seconds


def sampler_seconds(params: list[SamplingParams], n_vocab: int, allowed: jax.Array | None = None, repeats: int = 300) -> float:
    """The sampler alone on random logits, one row per params, with or without a token mask (also
    benchmarks/logit_bias.py's)."""
    tensors = SamplingTensors.from_params(params)
    state = SamplerState.create(params, [[1, 2, 3]] * len(params))
    logits = jax.random.normal(jax.random.key(0), (len(params), n_vocab))
    step = jax.jit(lambda logits, state, allowed: Sampler()(logits, tensors, state, allowed))
    jax.block_until_ready(step(logits, state, allowed))
    started = time.perf_counter()
    for _ in range(repeats):
        sampled, state = step(logits, state, allowed)
    jax.block_until_ready(sampled)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    llm = rz.LLM(smollm2_135m_path(), n_ctx=1024, max_batch=1)
    prompt_ids = tuple(llm.tokenize(PROMPT))
    n_vocab = llm.model.cfg.n_vocab
    free = RequestOptions.from_flat(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
    shaped = RequestOptions.from_flat(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True, response_format=ANY_TEXT)
    engines = {"default (4 steps/call, chained)": Engine(llm.model, llm.tokenizer, llm.n_ctx, 1),
               "1 step/call": Engine(llm.model, llm.tokenizer, llm.n_ctx, 1, decode_steps=1)}
    rows = []
    for name, engine in engines.items():
        for options in (free, shaped, free, shaped):  # the first pass compiles
            seconds = per_token_seconds(engine, options, prompt_ids)
        rows.append((name, per_token_seconds(engine, free, prompt_ids), per_token_seconds(engine, shaped, prompt_ids)))
    host = host_mask_seconds(engines["1 step/call"], prompt_ids)
    # Batch 1 on SmolLM2's vocabulary, llama.cpp's default settings; the mask allows every other token.
    mask = jnp.asarray(np.full((1, (n_vocab + 31) // 32), 0x55555555, np.int32))
    plain, with_mask = sampler_seconds([SamplingParams(seed=1)], n_vocab), sampler_seconds([SamplingParams(seed=1)], n_vocab, mask)
    step = rows[0][1]
    print(f"SmolLM2-135M Q4_1, batch 1, {N_TOKENS} tokens, greedy; n_vocab {n_vocab}")
    print("| engine | unconstrained ms/token | constrained ms/token | ratio |")
    print("|---|---:|---:|---:|")
    for name, free_s, shaped_s in rows:
        print(f"| {name} | {free_s * 1e3:.3f} | {shaped_s * 1e3:.3f} | {shaped_s / free_s:.3f} |")
    median = statistics.median(host)
    print(f"host mask + copy to device: median {median * 1e6:.1f} us, p90 {np.percentile(host, 90) * 1e6:.1f} us "
          f"({median / step:.1%} of a default decode step)")
    print(f"sampler: {plain * 1e6:.1f} us without the mask, {with_mask * 1e6:.1f} us with it "
          f"(+{(with_mask - plain) * 1e6:.1f} us, {(with_mask - plain) / step:.1%} of a default decode step)")
    print(f"mask cost per token (host + device): {(median + with_mask - plain) / step:.1%} of a decode step of {step * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
