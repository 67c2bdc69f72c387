"""The regression gate: fail when rz got slower than a baseline run.

When both runs measured the same peer on a test, the ratio to that peer is compared (a slower
machine or a noisy day moves both engines and cancels out); otherwise rz's own tok/s.
"""

from rz.bench.errors import BenchError


def check_regression(current: dict, baseline: dict, max_regression: float) -> dict:
    """Compare the subject engine's figures test by test; 'passed' is False if any fell beyond the threshold."""
    subject = current["engines"][0]["name"]
    if subject not in {engine["name"] for engine in baseline.get("engines", [])}:
        raise BenchError(f"the baseline has no {subject} results to compare with")
    comparisons = []
    for test, figure in _figures(current, subject).items():
        before = _figures(baseline, subject).get(test)
        if before is None:
            continue
        common = sorted(set(figure["ratios"]) & set(before["ratios"]))
        if common:
            peer = common[0]
            now, then, basis = figure["ratios"][peer], before["ratios"][peer], f"ratio to {peer}"
        else:
            now, then, basis = figure["tok_s"], before["tok_s"], "tok/s"
        change = now / then - 1
        comparisons.append({"test": test, "basis": basis, "baseline": then, "current": now, "change": change,
                            "regressed": change < -max_regression})
    if not comparisons:
        raise BenchError("the baseline and this run have no test in common: run the same tests as the baseline")
    return {
        "baseline_run_id": baseline.get("run_id"),
        "baseline_commit": baseline["environment"]["rz_git"]["commit"],
        "max_regression": max_regression,
        "passed": not any(c["regressed"] for c in comparisons),
        "comparisons": comparisons,
    }


def format_gate(gate: dict) -> str:
    lines = [f"regression gate (max {gate['max_regression']:.1%} slower than baseline {str(gate['baseline_commit'])[:10]}):"]
    for c in gate["comparisons"]:
        verdict = "REGRESSION" if c["regressed"] else "ok"
        lines.append(f"  {c['test']:<24} {c['basis']:<22} {c['baseline']:>10.3f} -> {c['current']:>10.3f}  {c['change']:+.1%}  {verdict}")
    lines.append("  passed" if gate["passed"] else "  FAILED")
    return "\n".join(lines)


def _figures(result: dict, subject: str) -> dict[str, dict]:
    """test name -> subject's mean tok/s and its ratios to each peer."""
    figures = {}
    for entry in result.get("results", []):
        if entry["engine"] == subject and entry["status"] == "ok":
            figures[entry["test"]["name"]] = {"tok_s": entry["tokens_per_second"]["mean"], "ratios": {}}
    for ratio in result.get("ratios", []):
        if ratio["engine"] == subject and ratio["test"] in figures:
            figures[ratio["test"]]["ratios"][ratio["peer"]] = ratio["ratio"]
    return figures
