"""The result schema: a real result passes, each kind of damage is caught and located."""

import copy
import re
import json

import pytest

from bench_fakes import scripted
from rz.bench import engines as engines_module
from rz.bench.cli import main
from rz.bench.errors import BenchError
from rz.bench.history import append_history, load_results
from rz.bench.schema import SCHEMA_VERSION, validate_result


@pytest.fixture(scope="module")
def result(tmp_path_factory, smollm2_path) -> dict:
    path = tmp_path_factory.mktemp("schema") / "result.json"
    with pytest.MonkeyPatch.context() as patch:
        for engine_class in (scripted("subject", [1.0, 1.1]), scripted("peer", [2.0])):
            patch.setitem(engines_module.ENGINES, engine_class.name, engine_class)
        code = main(["--model", str(smollm2_path), "--engines", "subject,peer", "--tests", "pp16,tg4", "--no-isolate",
                     "--reps-min", "2", "--reps-max", "2", "--no-bandwidth", "--quiet", "--no-history", "--json", str(path)])
    assert code == 0
    return json.loads(path.read_text())


def test_a_run_validates(result):
    validate_result(result)
    assert result["schema_version"] == SCHEMA_VERSION and result["mode"] == "engines"


@pytest.mark.parametrize("damage, where", [
    (lambda r: r.pop("environment"), "(top level)"),
    (lambda r: r.update(schema_version=0), "schema_version"),
    (lambda r: r["model"].update(sha256="abc"), "model/sha256"),
    (lambda r: r["results"][0].update(tokens_per_second=None), "results/0/tokens_per_second"),
    (lambda r: r["results"][1].update(status="great"), "results/1/status"),
    (lambda r: r["results"][0]["samples"][0].update(tokens=-1), "results/0/samples/0/tokens"),
    (lambda r: r["results"][0].update(stop_reason="tired"), "results/0/stop_reason"),
    (lambda r: r["ratios"][0].pop("ci95"), "ratios/0"),
    (lambda r: r["engines"][0]["resources"].update(peak_rss_bytes="1 GB"), "engines/0/resources/peak_rss_bytes"),
])
def test_damage_is_caught_and_located(result, damage, where):
    broken = copy.deepcopy(result)
    damage(broken)
    with pytest.raises(BenchError, match=re.escape(f"schema v{SCHEMA_VERSION} at {where}:")):
        validate_result(broken)


def test_a_skipped_result_needs_its_reason(result):
    broken = copy.deepcopy(result)
    broken["results"][0].update(status="skipped", reason=None, tokens_per_second=None, stop_reason=None)
    with pytest.raises(BenchError, match="results/0/reason"):
        validate_result(broken)


def test_history_names_the_bad_line(result, tmp_path):
    history = tmp_path / "history.jsonl"
    append_history(result, history)
    broken = copy.deepcopy(result)
    broken["mode"] = "other"
    append_history(broken, history)
    with pytest.raises(BenchError, match=r"history.jsonl:2: result does not match"):
        load_results(history)
    history.write_text(history.read_text() + "{not json\n")
    with pytest.raises(BenchError, match=r"history.jsonl:2"):
        load_results(history)
