"""rz's token ids equal llama.cpp's on the real models, for a varied corpus and random text."""

import pytest
from tokenizer_cases import CORPUS, encoding_mismatches, fuzz_texts


@pytest.mark.parametrize("model_name", ["gemma3", "smollm2"])
def test_corpus_matches_llama_cpp(model_name, request):
    model = request.getfixturevalue(model_name)
    failures = encoding_mismatches(model, CORPUS)
    assert not failures, f"{len(failures)} mismatches, first ones:\n" + "\n".join(failures[:5])


@pytest.mark.parametrize("model_name", ["gemma3", "smollm2"])
def test_random_text_matches_llama_cpp(model_name, request):
    model = request.getfixturevalue(model_name)
    failures = encoding_mismatches(model, fuzz_texts(300, seed=1234))
    assert not failures, f"{len(failures)} mismatches, first ones:\n" + "\n".join(failures[:5])
