"""Greedy parity with llama.cpp, next to each engine's own noise floor.

A greedy continuation is a chain of argmaxes: a rounding difference anywhere can move a near-tie,
and the rest of the continuation with it. So "identical to llama.cpp's" only means something next
to what an engine does against itself under the smallest change of its arithmetic. The change
measured here is issue 3's calibration: the prompt evaluated in one batch, or one token at a time.

    python -m rz.bench parity [--model M.gguf] [--prompts 48] [--tokens 48] [--json FILE]

Three comparisons, each over the first 12 prompts (the parity test's) and over all of them:
  - rz against llama.cpp: rz.LLM.generate against llama.cpp's prompt-in-one-batch continuation;
  - llama.cpp against itself: its prompt one token at a time against in one batch;
  - rz against itself: rz's model fed one token at a time (the decode kernels throughout)
    against rz.LLM.generate (prompt prefilled in one chunk).
"""

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rz.bench.errors import BenchError

# The parity test's twelve come first (tests/test_parity_generation.py takes GREEDY_PROMPTS[:12]).
GREEDY_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def quicksort(arr):\n",
    "The three laws of thermodynamics are",
    "Q: What is the boiling point of water?\nA:",
    "Photosynthesis is the process by which",
    "In 1969, the first humans",
    "import numpy as np\n\n# compute the mean of a list\n",
    "The best way to learn a new language is",
    "Dear hiring manager,\n\nI am writing to apply for",
    "1, 1, 2, 3, 5, 8, 13,",
    "The mitochondria is",
    "The history of the Roman Empire",
    "To make a cup of tea, first",
    "class Stack:\n    def __init__(self):\n",
    "The weather today is",
    "My favorite book is",
    "Water is made of",
    "The largest planet in our solar system",
    "SELECT name, age FROM users WHERE",
    "A recipe for chocolate chip cookies:\n",
    "The French Revolution began in",
    "Machine learning is a field of",
    "Here is a short poem about autumn:\n",
    "The quick brown fox",
    "How do airplanes fly?",
    "The stock market crashed in",
    "for i in range(10):\n",
    "Albert Einstein was born in",
    "The human heart has four chambers:",
    "Tips for a good night's sleep:\n1.",
    "The Great Wall of China",
    "Translate to French: Good morning, how are you?\n",
    "The difference between a virus and a bacterium is",
    "Once there was a dragon who",
    "The speed of light is",
    "<html>\n<head>\n<title>",
    "Shakespeare wrote many plays, including",
    "The population of Tokyo",
    "Climate change is caused by",
    "The recipe calls for two cups of flour and",
    "function add(a, b) {\n",
    "The Pythagorean theorem states that",
    "In the year 2050, cities will",
    "The dog barked at the",
    "Summary of the meeting:\n-",
    "The most important invention of the 20th century was",
    "Why is the sky blue?",
)
TEST_PROMPTS = 12  # how many the parity test takes


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass(frozen=True)
class Agreement:
    identical: int  # continuations identical token for token
    prompts: int
    mean_prefix: float  # mean matching prefix, as a fraction of the continuation's length

    def __str__(self) -> str:
        return f"{self.identical}/{self.prompts} identical, prefix {self.mean_prefix:.0%}"


def agreement(got: Sequence[Sequence[int]], expected: Sequence[Sequence[int]]) -> Agreement:
    """How far continuations `got` follow `expected`, pairwise (each pair of the same length)."""
    if len(got) != len(expected) or not got:
        raise ValueError(f"need the same number of continuations, at least one: got {len(got)} and {len(expected)}")
    prefixes = [matching_prefix(g, e) / max(1, len(e)) for g, e in zip(got, expected)]
    identical = sum(list(g) == list(e) for g, e in zip(got, expected))
    return Agreement(identical, len(got), float(np.mean(prefixes)))


def llama_cpp_greedy(llm, prompt_ids: Sequence[int], n_tokens: int, one_at_a_time: bool = False) -> list[int]:
    """llama.cpp's greedy continuation (a llama_cpp.Llama made with logits_all=True): argmax of its
    logits, one token at a time, EOS ignored. The prompt goes in one batch, or one token at a time."""
    llm.reset()
    for chunk in ([[t] for t in prompt_ids] if one_at_a_time else [list(prompt_ids)]):
        llm.eval(chunk)
    tokens = []
    for _ in range(n_tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
        llm.eval([token])
    return tokens


class OneTokenAtATime:
    """rz's model fed one token per forward call through its KV cache: a decode step's kernels for
    the prompt too, where rz.LLM prefills it in one chunk."""

    def __init__(self, model, n_ctx: int):
        import jax

        self.model, self.n_ctx = model, n_ctx
        self._forward = jax.jit(model.forward, donate_argnums=(1,))
        self._lm_head = jax.jit(model.lm_head)

    def greedy(self, prompt_ids: Sequence[int], n_tokens: int) -> list[int]:
        import jax.numpy as jnp

        if len(prompt_ids) + n_tokens > self.n_ctx:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + {n_tokens} do not fit n_ctx {self.n_ctx}")
        cache = self.model.init_cache(1, self.n_ctx)
        tokens = []
        for position in range(len(prompt_ids) + n_tokens - 1):
            token = prompt_ids[position] if position < len(prompt_ids) else tokens[-1]
            hidden, cache = self._forward(
                self.model.weights, cache, jnp.array([[token]], jnp.int32), jnp.array([[position]], jnp.int32)
            )
            if position >= len(prompt_ids) - 1:
                tokens.append(int(np.argmax(np.asarray(self._lm_head(self.model.weights, hidden))[0, 0])))
        return tokens


def measure(model_path: Path, n_prompts: int = len(GREEDY_PROMPTS), n_tokens: int = 48, threads: int = 2, progress=print) -> dict:
    """The three comparisons (module docstring) over the first n_prompts of GREEDY_PROMPTS."""
    import llama_cpp

    from rz.bench.llamacpp_setup import use_safe_defaults

    import rz

    if not 1 <= n_prompts <= len(GREEDY_PROMPTS):
        raise BenchError(f"--prompts must be 1..{len(GREEDY_PROMPTS)}, got {n_prompts}")
    if n_tokens < 1:
        raise BenchError(f"--tokens must be at least 1, got {n_tokens}")
    n_ctx = 512
    use_safe_defaults()
    oracle = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=threads, logits_all=True, verbose=False)
    try:
        prompts = [oracle.tokenize(p.encode(), add_bos=True, special=False) for p in GREEDY_PROMPTS[:n_prompts]]
        progress("llama.cpp, prompts in one batch")
        llama_batch = [llama_cpp_greedy(oracle, ids, n_tokens) for ids in prompts]
        progress("llama.cpp, prompts one token at a time")
        llama_single = [llama_cpp_greedy(oracle, ids, n_tokens, one_at_a_time=True) for ids in prompts]
    finally:
        oracle.close()
    llm = rz.LLM(str(model_path), n_ctx=n_ctx)
    progress("rz.LLM.generate")
    rz_generate = [c.token_ids for c in llm.generate(prompts, max_tokens=n_tokens, temperature=0.0, ignore_eos=True)]
    progress("rz, one token at a time")
    single = OneTokenAtATime(llm.model, n_ctx)
    rz_single = [single.greedy(ids, n_tokens) for ids in prompts]
    pairs = {
        "rz vs llama.cpp": (rz_generate, llama_batch),
        "llama.cpp vs itself": (llama_single, llama_batch),
        "rz vs itself": (rz_single, rz_generate),
    }
    first = min(TEST_PROMPTS, n_prompts)
    return {
        "model": str(model_path),
        "prompts": n_prompts,
        "tokens": n_tokens,
        "comparisons": {
            name: {"first_12": asdict(agreement(got[:first], want[:first])), "all": asdict(agreement(got, want))}
            for name, (got, want) in pairs.items()
        },
    }


def table(result: dict) -> str:
    """The comparisons as a markdown table."""
    lines = [
        f"Greedy continuations of {result['tokens']} tokens, {Path(result['model']).name}",
        "",
        f"| comparison | first {min(TEST_PROMPTS, result['prompts'])} prompts | all {result['prompts']} |",
        "|---|---|---|",
    ]
    for name, rows in result["comparisons"].items():
        lines.append(f"| {name} | {Agreement(**rows['first_12'])} | {Agreement(**rows['all'])} |")
    return "\n".join(lines)
