"""`python -m rz.bench parity`: the agreement measures, and one small run on the real SmolLM2."""

import json

import pytest

from rz.bench.cli import main
from rz.bench.parity import GREEDY_PROMPTS, TEST_PROMPTS, Agreement, agreement, matching_prefix


def test_matching_prefix_counts_the_shared_leading_tokens():
    assert matching_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert matching_prefix([1, 2], [1, 2, 3]) == 2
    assert matching_prefix([5], [1]) == 0
    assert matching_prefix([], [1]) == 0


def test_agreement_counts_identical_continuations_and_the_mean_prefix():
    got = [[1, 2, 3, 4], [1, 2, 9, 9], [7, 7, 7, 7]]
    expected = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]
    assert agreement(got, expected) == Agreement(identical=1, prompts=3, mean_prefix=pytest.approx((1 + 0.5 + 0) / 3))
    assert str(Agreement(6, 12, 0.625)) == "6/12 identical, prefix 62%"


def test_agreement_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="same number"):
        agreement([[1]], [[1], [2]])
    with pytest.raises(ValueError, match="at least one"):
        agreement([], [])


def test_the_parity_test_prompts_come_first_and_are_distinct():
    assert len(GREEDY_PROMPTS) >= 4 * TEST_PROMPTS
    assert len(set(GREEDY_PROMPTS)) == len(GREEDY_PROMPTS)
    assert GREEDY_PROMPTS[0] == "The capital of France is"


@pytest.mark.parametrize("args, message", [(["--prompts", "0"], "--prompts must be"), (["--tokens", "0"], "--tokens must be")])
def test_bad_options_are_one_line_errors(args, message, capsys):
    assert main(["parity", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_a_small_run_compares_rz_and_llama_cpp_each_with_itself(smollm2_path, tmp_path, capsys):
    out = tmp_path / "parity.json"
    code = main(["parity", "--model", str(smollm2_path), "--prompts", "2", "--tokens", "6", "--json", str(out), "--quiet"])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 2 and result["tokens"] == 6
    assert set(result["comparisons"]) == {"rz vs llama.cpp", "llama.cpp vs itself", "rz vs itself"}
    for rows in result["comparisons"].values():
        for row in rows.values():
            assert row["prompts"] == 2 and 0 <= row["identical"] <= 2 and 0.0 <= row["mean_prefix"] <= 1.0
    # "The capital of France is": every engine's first token is the same clear winner
    assert all(rows["all"]["mean_prefix"] > 0 for rows in result["comparisons"].values())
    assert "| rz vs llama.cpp |" in capsys.readouterr().out
