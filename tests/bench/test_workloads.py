"""Test names, impossible settings, and prompts of exact length that no cache can answer."""

import pytest

from rz.bench.errors import BenchError
from rz.bench.workloads import PromptMaker, Workload, model_tokenizer, parse_tests


def test_llama_bench_names_and_token_counts():
    tests = parse_tests("pp512,tg128,pp512+tg128", depths="0,1024", batches="1,8")
    assert [t.name for t in tests] == [
        "pp512", "pp512 @ d1024",
        "tg128", "tg128 x8", "tg128 @ d1024", "tg128 x8 @ d1024",
        "pp512+tg128", "pp512+tg128 @ d1024",
    ]
    pp, tg_batch = tests[0], tests[3]
    assert (pp.prompt_length, pp.max_tokens, pp.tokens_counted) == (512, 1, 512)
    assert (tg_batch.prompt_length, tg_batch.max_tokens, tg_batch.tokens_counted) == (1, 129, 8 * 128)
    pg_deep = tests[-1]
    assert (pg_deep.prompt_length, pg_deep.max_tokens, pg_deep.tokens_counted) == (1536, 129, 640)
    assert parse_tests("pg64+16")[0] == Workload("pg", 64, 16)


@pytest.mark.parametrize("tests, depths, batches, message", [
    ("pp0", "0", "1", "impossible"),
    ("tg-4", "0", "1", "impossible"),
    ("pp512+tg0", "0", "1", "impossible"),
    ("qq12", "0", "1", "unknown test"),
    ("", "0", "1", "empty"),
    ("tg8", "-1", "1", "--depth -1 is impossible"),
    ("tg8", "0", "-2", "--batch -2 is impossible"),
    ("tg8", "0", "0", "--batch 0 is impossible"),
    ("tg8", "0", "two", "comma list of integers"),
    ("pp512", "0", "8", "a batch applies to tg"),
])
def test_impossible_settings_are_one_clear_error(tests, depths, batches, message):
    with pytest.raises(BenchError, match=message):
        parse_tests(tests, depths, batches)


def test_a_test_longer_than_the_context_is_refused():
    with pytest.raises(BenchError, match="needs 1153 positions per sequence, more than --n-ctx 1024"):
        parse_tests("pp1024+tg128", n_ctx=1024)


def test_prompts_have_the_exact_length_and_differ_by_repetition(smollm2_path):
    maker = PromptMaker(model_tokenizer(smollm2_path), seed=0)
    test = Workload("pp", 100)
    first, again, second = maker.make(100, test, 0), maker.make(100, test, 0), maker.make(100, test, 1)
    assert len(first.ids) == 100 and first == again
    assert first.ids[:2] != second.ids[:2]  # a prefix cache gets nothing from the previous repetition
    assert maker.make(100, test, 0, sequence=1).ids != first.ids
    # The text is what an HTTP server is sent: it must give back the same tokens.
    assert list(model_tokenizer(smollm2_path).encode(first.text, add_bos=None)) == list(first.ids)
