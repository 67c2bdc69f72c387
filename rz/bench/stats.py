"""The statistics of a benchmark: summaries, percentiles, MAD outliers, the CV stopping rule, ratios.

Method: repetitions continue until the coefficient of variation
falls under a threshold or a repetition/time budget runs out (Hoefler & Belli); outliers are
flagged with the median absolute deviation and reported, never dropped (Fleming & Wallace);
latencies are summarised by p50/p95/p99 (Georges et al.).
"""

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

# Iglewicz & Hoaglin: a modified z-score above 3.5 marks an outlier. The MAD of a normal
# sample is 0.6745 sigma; when more than half the samples are equal the MAD is 0, and the
# mean absolute deviation (0.7979 sigma) stands in for it (IBM's convention).
MAD_Z_THRESHOLD = 3.5
# Below five samples the median of the deviations rests on one or two of them and any
# spread looks extreme: too few to call one sample odd.
MIN_OUTLIER_SAMPLES = 5
_SIGMA_PER_MAD = 1 / 0.6745
_SIGMA_PER_MEAN_AD = 1.253314


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics (numpy's default)."""
    if len(values) == 0:
        raise ValueError("percentile of an empty sample")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def coefficient_of_variation(values: Sequence[float]) -> float:
    """Sample standard deviation over the mean; inf for fewer than two samples."""
    if len(values) < 2:
        return math.inf
    mean = float(np.mean(values))
    return float(np.std(values, ddof=1)) / mean if mean else math.inf


def mad_outliers(values: Sequence[float], threshold: float = MAD_Z_THRESHOLD) -> list[dict]:
    """Samples whose modified z-score 0.6745 (x - median) / MAD exceeds the threshold: index, value, z."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < MIN_OUTLIER_SAMPLES:
        return []
    deviations = np.abs(x - np.median(x))
    sigma = float(np.median(deviations)) * _SIGMA_PER_MAD
    if sigma == 0.0:
        sigma = float(np.mean(deviations)) * _SIGMA_PER_MEAN_AD
    if sigma == 0.0:
        return []
    z = (x - np.median(x)) / sigma
    return [
        {"index": int(i), "value": float(x[i]), "robust_z": round(float(z[i]), 3)}
        for i in np.flatnonzero(np.abs(z) > threshold)
    ]


def summarize(values: Sequence[float]) -> dict:
    """Mean, spread, order statistics and a 95% confidence interval of the mean of a sample."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        raise ValueError("summary of an empty sample")
    mean = float(np.mean(x))
    stdev = float(np.std(x, ddof=1)) if len(x) > 1 else 0.0
    half_width = _t95(len(x) - 1) * stdev / math.sqrt(len(x)) if len(x) > 1 else math.inf
    return {
        "n": int(len(x)),
        "mean": mean,
        "stdev": stdev,
        "cv": coefficient_of_variation(x) if len(x) > 1 else None,
        "min": float(np.min(x)),
        "max": float(np.max(x)),
        "median": float(np.median(x)),
        "ci95": [mean - half_width, mean + half_width] if len(x) > 1 else None,
    }


def latency_summary(values: Sequence[float]) -> dict | None:
    """Mean and p50/p95/p99 of latencies in seconds, or None when there are none."""
    if len(values) == 0:
        return None
    return {
        "n": len(values),
        "mean": float(np.mean(values)),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
    }


def ratio(numerator: dict, denominator: dict) -> dict:
    """The ratio of two summarised means, with its spread by first-order error propagation.

    cv is the ratio's relative spread sqrt(cv_a^2 + cv_b^2) of single repetitions; ci95 uses
    the standard errors of the two means. Both are None when a side has a single repetition.
    """
    value = numerator["mean"] / denominator["mean"]
    if numerator["cv"] is None or denominator["cv"] is None:
        return {"ratio": value, "cv": None, "ci95": None}
    cv_a, cv_b = numerator["cv"], denominator["cv"]
    relative_se = math.sqrt(cv_a**2 / numerator["n"] + cv_b**2 / denominator["n"])
    return {
        "ratio": value,
        "cv": math.sqrt(cv_a**2 + cv_b**2),
        "ci95": [value * (1 - 1.96 * relative_se), value * (1 + 1.96 * relative_se)],
    }


@dataclass(frozen=True)
class StoppingRule:
    """When to stop repeating: CV under cv_threshold after min_reps, or max_reps, or max_seconds."""

    cv_threshold: float = 0.05
    min_reps: int = 3
    max_reps: int = 10
    max_seconds: float = 60.0

    def reason_to_stop(self, values: Sequence[float], seconds_spent: float) -> str | None:
        """'cv', 'max_reps' or 'max_time' once repetitions should stop; None to go on."""
        n = len(values)
        if n >= self.min_reps and coefficient_of_variation(values) <= self.cv_threshold:
            return "cv"
        if n >= self.max_reps:
            return "max_reps"
        if n >= 1 and seconds_spent >= self.max_seconds:
            return "max_time"
        return None


def _t95(degrees_of_freedom: int) -> float:
    """Two-sided 95% Student t quantile; between table rows the smaller dof (the wider interval)."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
             9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}
    return next(table[dof] for dof in sorted(table, reverse=True) if dof <= degrees_of_freedom)
