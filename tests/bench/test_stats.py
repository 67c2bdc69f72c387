"""The statistics on samples whose answers are known by hand."""

import math

import pytest

from rz.bench import stats


def test_percentiles_interpolate_between_order_statistics():
    values = [float(v) for v in range(1, 11)]  # 1..10
    assert stats.percentile(values, 50) == pytest.approx(5.5)
    assert stats.percentile(values, 95) == pytest.approx(9.55)
    assert stats.percentile(values, 99) == pytest.approx(9.91)
    assert stats.percentile([7.0], 99) == 7.0
    assert stats.percentile([3.0, 1.0, 2.0], 0) == 1.0  # order of the input does not matter


def test_percentile_of_nothing_is_an_error():
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def test_latency_summary_reports_the_three_percentiles():
    summary = stats.latency_summary([0.010, 0.020, 0.030, 0.040, 1.000])
    assert summary["p50"] == pytest.approx(0.030)
    assert summary["p95"] == pytest.approx(0.040 + 0.8 * 0.960)
    assert summary["p99"] == pytest.approx(0.040 + 0.96 * 0.960)
    assert summary["mean"] == pytest.approx(0.220)
    assert stats.latency_summary([]) is None


def test_coefficient_of_variation_uses_the_sample_stdev():
    assert stats.coefficient_of_variation([9.0, 10.0, 11.0]) == pytest.approx(0.1)
    assert stats.coefficient_of_variation([5.0]) == math.inf


def test_summary_has_a_student_t_confidence_interval():
    summary = stats.summarize([9.0, 10.0, 11.0])
    assert summary["mean"] == 10.0 and summary["stdev"] == pytest.approx(1.0) and summary["median"] == 10.0
    half_width = 4.303 * 1.0 / math.sqrt(3)  # t(0.975, 2 dof)
    assert summary["ci95"] == pytest.approx([10.0 - half_width, 10.0 + half_width])
    assert stats.summarize([4.0])["ci95"] is None


def test_mad_flags_the_outlier_and_keeps_the_rest():
    values = [100.0, 101.0, 99.0, 100.5, 99.5, 60.0]
    outliers = stats.mad_outliers(values)
    assert [o["index"] for o in outliers] == [5]
    assert outliers[0]["value"] == 60.0 and outliers[0]["robust_z"] < -3.5


def test_mad_zero_falls_back_to_the_mean_absolute_deviation():
    # More than half the samples equal: the MAD is 0, yet 50 is plainly an outlier and 10.5 is not.
    outliers = stats.mad_outliers([10.0, 10.0, 10.0, 10.0, 10.5, 50.0])
    assert [o["index"] for o in outliers] == [5]
    assert stats.mad_outliers([3.0, 3.0, 3.0, 3.0, 3.0]) == []
    assert stats.mad_outliers([10.0, 10.1, 9.9, 100.0]) == []  # four samples are too few to call one odd


def test_stopping_rule_stops_on_cv_only_after_the_minimum():
    rule = stats.StoppingRule(cv_threshold=0.05, min_reps=3, max_reps=10, max_seconds=60)
    assert rule.reason_to_stop([100.0, 100.0], 1.0) is None  # CV 0 but only two repetitions
    assert rule.reason_to_stop([100.0, 101.0, 99.0], 1.0) == "cv"
    assert rule.reason_to_stop([100.0, 150.0, 60.0], 1.0) is None


def test_stopping_rule_budgets():
    rule = stats.StoppingRule(cv_threshold=0.01, min_reps=2, max_reps=4, max_seconds=5)
    noisy = [100.0, 150.0, 60.0, 120.0]
    assert rule.reason_to_stop(noisy, 1.0) == "max_reps"
    assert rule.reason_to_stop(noisy[:2], 5.0) == "max_time"
    assert rule.reason_to_stop([], 99.0) is None  # never stops before one repetition


def test_ratio_propagates_both_spreads():
    a = stats.summarize([90.0, 100.0, 110.0])  # cv 0.1
    b = stats.summarize([180.0, 200.0, 220.0])  # cv 0.1
    r = stats.ratio(a, b)
    assert r["ratio"] == pytest.approx(0.5)
    assert r["cv"] == pytest.approx(math.sqrt(0.02))
    relative_se = math.sqrt(0.01 / 3 + 0.01 / 3)
    assert r["ci95"] == pytest.approx([0.5 * (1 - 1.96 * relative_se), 0.5 * (1 + 1.96 * relative_se)])


def test_a_single_repetition_has_no_spread():
    r = stats.ratio(stats.summarize([10.0]), stats.summarize([9.0, 11.0]))
    assert r == {"ratio": 1.0, "cv": None, "ci95": None}
