"""What logit_bias costs: decode on SmolLM2 at batch 1 and 8, unbiased and with 300 biases per row,
and the sampler alone on SmolLM2's and Gemma 3's vocabularies (issue 19: an unbiased batch must
cost what it did before biases existed).

Run it from a checkout with biases and from one without (the unbiased rows only), interleaved:

    flock -x /tmp/rz-cpu.lock python benchmarks/logit_bias.py
"""

import statistics

import numpy as np

import rz
from rz.engine import Engine
from rz.generation import GenerationRequest
from rz.model_files import smollm2_135m_path
from rz.request import RequestOptions
from rz.sampling import SamplingParams
from rz.scheduler import Scheduler

from constraint_mask import sampler_seconds  # benchmarks/, this script's directory

N_TOKENS = 128
PROMPT = "Write a long story about a lighthouse keeper."
HAS_BIAS = "logit_bias" in RequestOptions().flat()


def per_token_seconds(engine: Engine, options: RequestOptions, prompt_ids: tuple[int, ...], rows: int) -> float:
    """Decode seconds per step of `rows` requests decoded together (their first tokens left out)."""
    scheduler = Scheduler(engine)
    sequences = [scheduler.add(GenerationRequest(prompt_ids, options)) for _ in range(rows)]
    list(scheduler.drain())
    first = min(s.timings.first_token_at for s in sequences)
    return (max(s.timings.finished_at for s in sequences) - first) / (N_TOKENS - 1)


def biases(n_vocab: int) -> dict[int, float]:
    """300 biases (OpenAI's most) spread over the vocabulary, none large enough to take over."""
    return {int(t): 0.5 for t in np.linspace(0, n_vocab - 1, 300).astype(int)}


def main() -> None:
    llm = rz.LLM(smollm2_135m_path(), n_ctx=512, max_batch=8)
    prompt_ids = tuple(llm.tokenize(PROMPT))
    n_vocab = llm.model.cfg.n_vocab
    plain = RequestOptions.from_flat(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
    cases = {"unbiased": plain}
    if HAS_BIAS:
        cases["300 biases per row"] = RequestOptions.from_flat(
            max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True, logit_bias=biases(n_vocab)
        )
    print(f"SmolLM2-135M Q4_1, {N_TOKENS} greedy tokens per row, default engine (4 steps per call, chained); "
          f"logit_bias {'available' if HAS_BIAS else 'absent (a checkout without it)'}")
    print("| rows | requests | decode ms/step (median of 3) |")
    print("|---:|---|---:|")
    for rows in (1, 8):
        engine = Engine(llm.model, llm.tokenizer, llm.n_ctx, rows)
        for options in cases.values():  # the first pass compiles
            per_token_seconds(engine, options, prompt_ids, rows)
        for name, options in cases.items():
            seconds = statistics.median(per_token_seconds(engine, options, prompt_ids, rows) for _ in range(3))
            print(f"| {rows} | {name} | {seconds * 1e3:.3f} |")
    print("| vocabulary | rows | sampler us, unbiased | sampler us, 300 biases per row |")
    print("|---:|---:|---:|---:|")
    for vocab in (n_vocab, 262_144):
        for rows in (1, 8):
            unbiased = sampler_seconds([SamplingParams(seed=i) for i in range(rows)], vocab, repeats=200)
            biased = "-"
            if HAS_BIAS:
                bias = tuple(sorted(biases(vocab).items()))
                biased_rows = [SamplingParams(seed=i, logit_bias=bias) for i in range(rows)]
                biased = f"{sampler_seconds(biased_rows, vocab, repeats=200) * 1e6:.1f}"
            print(f"| {vocab} | {rows} | {unbiased * 1e6:.1f} | {biased} |")


if __name__ == "__main__":
    main()
