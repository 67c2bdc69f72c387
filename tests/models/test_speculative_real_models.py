"""Speculative decoding on the real models: greedy output is plain decoding's, token for token (up to
the kernels' near ties), for every proposer.

A module of its own, each case's executables released when it ends: a real model's verify and
draft calls compile many shapes, and one process that held them all with the tiny models' reached
vm.max_map_count, where XLA aborts mid-compile (see tests/conftest.py)."""

import pytest

import rz
from rz.bench.passage import PASSAGE
from rz.model_files import gemma3_270m_path, smollm2_135m_path
from rz.request import RequestOptions, SamplingParams
from support.speculation import assert_same_up_to_near_ties, drafting_engine, plain_engine, release_executables, run

REAL_MODELS = {"smollm2": smollm2_135m_path, "gemma3": gemma3_270m_path}
GREEDY = RequestOptions(max_tokens=32, sampling=SamplingParams(temperature=0))


@pytest.fixture(scope="module", params=list(REAL_MODELS))
def real(request):
    """A real model, 24 prompts (half asking to copy a passage: drafts mostly kept; half free: mostly
    rejected), and its plain greedy outputs at batch 4, of the drafting engines' blocks and chunks."""
    llm = rz.LLM(REAL_MODELS[request.param](), n_ctx=1024, max_batch=4)
    paragraphs = [p for p in PASSAGE.split("\n\n") if p.strip()]
    prompts = []
    for i in range(12):
        text = paragraphs[i % len(paragraphs)][(i // len(paragraphs)) * 80 :][:400]
        prompts.append(llm.tokenize(f"Copy this text exactly.\n\n{text}\n\nCopy:\n{text[:40]}"))
        prompts.append(llm.tokenize(f"Write a short story about {['a heron', 'bread', 'primes', 'a lighthouse'][i % 4]}, part {i}."))
    plain = run(plain_engine(llm, 4), prompts, GREEDY)
    yield llm, prompts, plain
    release_executables()


@pytest.fixture(autouse=True)
def release_after_each_case():
    yield
    release_executables()


@pytest.mark.slow
@pytest.mark.parametrize("proposer", ["ngram", "self"])
def test_greedy_speculative_decoding_is_exact_on_real_models(real, proposer):
    llm, prompts, plain = real
    engine = drafting_engine(llm, 4)  # verify calls of 4 tokens a row
    speculative = run(engine, prompts, RequestOptions(**{**GREEDY.__dict__, "speculative": proposer}))
    assert engine.n_accepted > 0
    assert_same_up_to_near_ties(llm, prompts, speculative, plain)
