"""The timing loop on scripted engines: warm-up, interleaving, stopping, outliers, skips, failures, ratios."""

import pytest

from rz.bench.engines.base import EngineSettings
from rz.bench.runner import Runner, compute_ratios
from rz.bench.stats import StoppingRule
from rz.bench.workloads import PromptMaker, Workload

from bench_fakes import scripted


class WordTokenizer:
    """One token per word: enough to make prompts without a model."""

    bos_id = 0

    def encode(self, text, add_bos=None):
        return [1 + sum(map(ord, word)) for word in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def run(engine_classes, tests, rule=StoppingRule(cv_threshold=0.05, min_reps=3, max_reps=6, max_seconds=1e9), warmup=1):
    settings = EngineSettings(model_path="unused.gguf", threads=2, n_ctx=512, isolated=False)
    engines = [cls(settings) for cls in engine_classes]
    runner = Runner(engines, PromptMaker(WordTokenizer()), rule, warmup=warmup, weight_bytes_per_token=1_000_000,
                    machine_gb_per_s=10.0)
    return runner.run(tests)


def test_warmup_is_kept_apart_and_engines_alternate_order():
    a = scripted("a", [9.0, 1.0, 1.0, 1.0])  # the first (warm-up) call is slow, like a JIT compile
    b = scripted("b", [2.0])
    calls = []
    a.calls = b.calls = calls
    results = run([a, b], [Workload("tg", n_gen=10)])
    assert [name for name, _, _ in calls] == ["a", "b", "a", "b", "b", "a", "a", "b"]
    first = results[0]
    assert first["warmup"][0]["seconds"] == 9.0
    assert first["tokens_per_second"]["mean"] == pytest.approx(10.0)  # warm-up not in the figure
    assert first["stop_reason"] == "cv" and first["tokens_per_second"]["n"] == 3


def test_every_engine_sees_the_same_prompt_at_each_repetition_and_a_new_one_next():
    a, b = scripted("a", [1.0]), scripted("b", [1.0])
    run([a, b], [Workload("pp", n_prompt=16)])
    assert [p for _, _, p in a.calls] == [p for _, _, p in b.calls]
    measured = [p for _, _, p in a.calls[1:]]
    assert len(set(measured)) == len(measured)


def test_noisy_engine_runs_to_its_budget_and_its_outlier_is_reported():
    a = scripted("a", [1.0, 1.0, 1.02, 0.98, 1.01, 0.99, 0.25])  # warm-up, 5 steady, then one 4x faster run
    results = run([a], [Workload("pp", n_prompt=100)], rule=StoppingRule(cv_threshold=0.001, min_reps=3, max_reps=6))
    result = results[0]
    assert result["stop_reason"] == "max_reps" and result["tokens_per_second"]["n"] == 6
    assert [o["index"] for o in result["outliers"]] == [5]
    assert result["tokens_per_second"]["max"] == pytest.approx(400.0)  # flagged, not dropped


def test_time_budget_stops_repetitions():
    a = scripted("a", [1.0, 1.0, 2.0, 1.0, 2.0])
    results = run([a], [Workload("tg", n_gen=8)], rule=StoppingRule(cv_threshold=0.001, min_reps=2, max_reps=50, max_seconds=0.0))
    assert results[0]["stop_reason"] == "max_time" and results[0]["tokens_per_second"]["n"] == 1


def test_skipped_and_failed_tests_are_reported_and_the_others_go_on():
    a = scripted("a", [1.0], unsupported_tests=("pp16 @ d8",))
    b = scripted("b", [1.0], fail_on="tg4")
    results = run([a, b], [Workload("pp", n_prompt=16, depth=8), Workload("tg", n_gen=4)])
    by_key = {(r["engine"], r["test"]["name"]): r for r in results}
    assert by_key["a", "pp16 @ d8"]["status"] == "skipped" and by_key["a", "pp16 @ d8"]["reason"] == "not scripted"
    assert by_key["b", "pp16 @ d8"]["status"] == "ok"
    assert by_key["b", "tg4"]["status"] == "failed" and by_key["b", "tg4"]["reason"] == "scripted failure"
    assert by_key["a", "tg4"]["status"] == "ok"


def test_latency_and_bandwidth_figures():
    a = scripted("a", [1.0])
    result = run([a], [Workload("tg", n_gen=100, batch=2)])[0]
    assert result["latency"]["itl_s"]["p50"] == pytest.approx(0.01)
    assert result["latency"]["ttft_s"]["p99"] == pytest.approx(0.1)
    # 200 tok/s over a batch of 2 is 100 decode steps/s, each reading 1 MB: 0.1 GB/s of 10.
    assert result["bandwidth"]["achieved_gb_per_s"] == pytest.approx(0.1)
    assert result["bandwidth"]["fraction_of_machine"] == pytest.approx(0.01)


def test_ratios_are_the_first_engine_over_each_peer():
    a, b, c = scripted("a", [1.0]), scripted("b", [2.0]), scripted("c", [0.5])
    results = run([a, b, c], [Workload("tg", n_gen=10)])
    ratios = {r["peer"]: r["ratio"] for r in compute_ratios(results, "a")}
    assert ratios == pytest.approx({"b": 2.0, "c": 0.5})
