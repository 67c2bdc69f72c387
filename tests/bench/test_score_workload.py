"""The scoring workload of `python -m rz.bench score`."""

from rz.bench.score import measure, table


def test_rz_and_llama_cpp_score_the_same_tokens_and_rank_the_same_top_tokens(smollm2_path):
    progress = []
    result = measure({"smollm2": smollm2_path}, 40, 256, 1, 2, progress.append)
    entry = result["models"][0]
    assert "not counted" in progress[0] and len(progress) == 2
    assert [len(entry["seconds"][engine]) for engine in ("rz", "llama.cpp")] == [1, 1]
    assert entry["ratio"] == entry["best_s"]["rz"] / entry["best_s"]["llama.cpp"]
    assert entry["same_top_token"] >= 0.9
    assert table(result).splitlines()[-1].startswith("| smollm2 |")
