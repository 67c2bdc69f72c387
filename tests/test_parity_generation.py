"""Greedy continuations of both real models against llama.cpp's, token for token.

llama.cpp against itself (one batch versus one token at a time) keeps 6-8 of 12 continuations
identical with a 62-78% mean matching prefix: float rounding moves near-ties. rz must land in
that noise: at least half identical and a mean matching prefix of at least 60%.
"""

import llama_cpp
import numpy as np
import pytest

import rz
from rz.model_files import gemma3_270m_path, smollm2_135m_path

N_TOKENS = 48
N_CTX = 512
PROMPTS = [
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
]
MODELS = {"gemma3": gemma3_270m_path, "smollm2": smollm2_135m_path}


def llama_cpp_greedy(model: llama_cpp.Llama, prompt_ids: list[int], n_tokens: int) -> list[int]:
    """llama.cpp's greedy continuation: argmax of its logits, one token at a time, EOS ignored."""
    model.reset()
    model.eval(prompt_ids)
    tokens = []
    for _ in range(n_tokens):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        tokens.append(token)
        model.eval([token])
    return tokens


def matching_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


SMOLLM2_XFAIL = pytest.mark.xfail(
    strict=True,
    reason=(
        "near-ties fall differently from llama.cpp's, and 12 prompts make the count jumpy. Measured "
        "for SmolLM2: session 4 2/12 identical, 45% mean prefix; with activation scales stored in f16 "
        "as llama.cpp's Q8_0/Q8_1 store them 3/12 55% (Gemma 3 went from 4/12 51% to 6/12 74%). "
        "Emulating llama.cpp's f16 attention as well (f16 queries, K/V and probabilities, its "
        "non-flash path) gave SmolLM2 5/12 73% but Gemma 3 4/12 59%, so it is not shipped. "
        "Session 7, prompts over 16 tokens prefilled with exact f32 activations: SmolLM2 4/12 61%, "
        "Gemma 3 7/12 76%. Open in issue 3."
    ),
)


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(n, marks=SMOLLM2_XFAIL) if n == "smollm2" else n for n in sorted(MODELS)])
def test_greedy_continuations_match_llama_cpp(name):
    path = str(MODELS[name]())
    oracle = llama_cpp.Llama(model_path=path, n_ctx=N_CTX, n_threads=2, logits_all=True, verbose=False)
    llm = rz.LLM(path, n_ctx=N_CTX)
    prompts = [oracle.tokenize(p.encode(), add_bos=True, special=False) for p in PROMPTS]
    expected = [llama_cpp_greedy(oracle, ids, N_TOKENS) for ids in prompts]
    got = [c.token_ids for c in llm.generate(prompts, max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)]
    identical = sum(g == e for g, e in zip(got, expected))
    prefix = np.mean([matching_prefix(g, e) / N_TOKENS for g, e in zip(got, expected)])
    print(f"{name}: {identical}/{len(PROMPTS)} identical, mean matching prefix {prefix:.0%}")
    assert identical >= len(PROMPTS) / 2
    assert prefix >= 0.60
