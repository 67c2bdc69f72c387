"""The command line end to end on scripted engines: tables, JSON, history, report, gate, bad input."""

import json

import pytest

from bench_fakes import scripted
from rz.bench.cli import main, parse_fraction
from rz.bench.history import load_results
from rz.bench.schema import validate_result

FAST = ["--reps-min", "2", "--reps-max", "3", "--warmup", "1", "--no-bandwidth", "--quiet", "--no-isolate"]


def bench(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_side_by_side_run_writes_a_valid_result_history_and_report(tmp_path, capsys, register, smollm2_path):
    register(scripted("fast", [1.0]), scripted("slow", [2.0]))
    result_path, history = tmp_path / "result.json", tmp_path / "history.jsonl"
    code, out, _ = bench(["--model", str(smollm2_path), "--engines", "fast,slow", "--tests", "pp32,tg8", "--batch", "1,2",
                          "--json", str(result_path), "--history", str(history), *FAST], capsys)
    assert code == 0
    assert "fast / slow" in out.splitlines()[0]
    assert "2.00 ± 0.00" in out  # fast is twice as fast as slow on every test
    result = json.loads(result_path.read_text())
    validate_result(result)
    assert [r["test"]["name"] for r in result["results"]] == ["pp32", "pp32", "tg8", "tg8", "tg8 x2", "tg8 x2"]
    assert {r["ratio"] for r in result["ratios"]} == {2.0}
    assert result["model"]["file_name"] == smollm2_path.name and len(result["model"]["sha256"]) == 64
    assert result["settings"]["threads"] >= 1 and result["environment"]["cpu"]["usable_cores"] >= 1
    assert load_results(history) == [result]

    markdown, plot = tmp_path / "report.md", tmp_path / "report.png"
    code, out, _ = bench(["report", "--history", str(history), "--markdown", str(markdown), "--plot", str(plot)], capsys)
    assert code == 0 and plot.stat().st_size > 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fast tg8 x2" in markdown.read_text() and "fast/slow pp32" in out


def test_regression_gate_passes_unchanged_and_fails_a_slowdown(tmp_path, capsys, register, smollm2_path):
    register(scripted("subject", [1.0]), scripted("peer", [1.0]))
    baseline = tmp_path / "baseline.json"
    common = ["--model", str(smollm2_path), "--engines", "subject,peer", "--tests", "tg8", "--no-history", *FAST]
    assert bench([*common, "--json", str(baseline)], capsys)[0] == 0
    code, out, _ = bench([*common, "--baseline", str(baseline), "--max-regression", "5%"], capsys)
    assert code == 0 and "passed" in out and "ratio to peer" in out
    register(scripted("subject", [1.1]), scripted("peer", [1.0]))  # 9% slower than the peer now
    code, out, _ = bench([*common, "--baseline", str(baseline), "--max-regression", "5%"], capsys)
    assert code == 3 and "REGRESSION" in out and "FAILED" in out


def test_gate_without_a_peer_compares_tok_s(tmp_path, capsys, register, smollm2_path):
    register(scripted("subject", [1.0]))
    baseline = tmp_path / "baseline.jsonl"
    common = ["--model", str(smollm2_path), "--engines", "subject", "--tests", "pp16", *FAST]
    assert bench([*common, "--history", str(baseline)], capsys)[0] == 0
    register(scripted("subject", [1.2]))
    code, out, _ = bench([*common, "--no-history", "--baseline", str(baseline), "--max-regression", "10"], capsys)
    assert code == 3 and "tok/s" in out


def test_threads_must_match(capsys, register, smollm2_path):
    register(scripted("two", [1.0], threads=2), scripted("one", [1.0], threads=1))
    code, _, err = bench(["--model", str(smollm2_path), "--engines", "two,one", "--tests", "tg8", "--no-history", *FAST], capsys)
    assert code == 2 and "thread settings differ (two 2, one 1)" in err


def test_a_failed_test_is_reported_with_exit_status_1(capsys, register, smollm2_path):
    register(scripted("flaky", [1.0], fail_on="tg8"))
    code, out, _ = bench(["--model", str(smollm2_path), "--engines", "flaky", "--tests", "pp16,tg8", "--no-history", *FAST], capsys)
    assert code == 1 and "flaky tg8: failed: scripted failure" in out


@pytest.mark.parametrize("args, message", [
    (["--engines", "rz,vllm"], "unknown engine 'vllm'"),
    (["--engines", "llama.cpp=http://x"], "engine llama.cpp runs in process and takes no URL"),
    (["--tests", "pp0"], "test 'pp0' is impossible"),
    (["--batch", "-1"], "--batch -1 is impossible"),
    (["--threads", "0"], "--threads 0 is impossible"),
    (["--reps-min", "5", "--reps-max", "2"], "--reps-min 5 and --reps-max 2 are impossible"),
    (["--cv", "five"], "'five' is not a percentage"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_status_2(args, message, capsys, smollm2_path):
    code, out, err = bench(["--model", str(smollm2_path), *args], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("rz.bench: error:") and message in err


def test_a_model_file_that_is_not_gguf(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"this is not a model" * 10)
    code, _, err = bench(["--model", str(fake), "--engines", "llama.cpp", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and "model.gguf is not a usable GGUF file" in err
    code, _, err = bench(["--model", str(tmp_path / "missing.gguf"), "--quiet"], capsys)
    assert code == 2 and "missing.gguf does not exist" in err


def test_an_unreachable_server_fails_preflight(capsys, free_port, smollm2_path):
    url = f"http://127.0.0.1:{free_port}"
    code, _, err = bench(["--model", str(smollm2_path), "--engines", f"llama-server={url}", "--quiet", "--no-history"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"llama-server at {url} does not answer" in err and "start it or fix the URL" in err


def test_serve_needs_an_arrival_pattern_and_a_reachable_server(capsys, free_port, smollm2_path):
    code, _, err = bench(["serve", "--url", "http://127.0.0.1:1", "--model", str(smollm2_path)], capsys)
    assert code == 2 and "one of the arguments --concurrency --rate is required" in err
    code, _, err = bench(["serve", "--url", f"http://127.0.0.1:{free_port}", "--model", str(smollm2_path), "--rate", "0"], capsys)
    assert code == 2 and "--rate 0.0 is impossible" in err
    code, _, err = bench(["serve", "--url", f"grpc://127.0.0.1:{free_port}", "--model", str(smollm2_path),
                          "--concurrency", "1", "--quiet"], capsys)
    assert code == 2 and err.count("\n") == 1 and f"rz server at grpc://127.0.0.1:{free_port} does not answer" in err


def test_schema_command_prints_the_schema(capsys):
    code, out, _ = bench(["schema"], capsys)
    assert code == 0 and json.loads(out)["properties"]["schema_version"] == {"const": 1}


@pytest.mark.parametrize("text, fraction", [("5%", 0.05), ("5", 0.05), ("0.05", 0.05), ("12.5%", 0.125), ("0", 0.0)])
def test_percentages(text, fraction):
    assert parse_fraction(text) == pytest.approx(fraction)


@pytest.mark.parametrize("args, message", [
    (["--proposers", "ngram,eagle"], "--proposers: expected a comma list of"),
    (["--workloads", "free,poetry"], "--workloads: expected a comma list of"),
    (["--reps", "0"], "--reps must be at least 1"),
    (["--model", "missing.gguf"], "--model missing.gguf: no such file"),
])
def test_speculative_bench_refuses_bad_input_in_one_line(args, message, capsys):
    code, out, err = bench(["speculative", *args], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize("args, message", [
    (["shared-prompt", "--engines", "rz,vllm"], "--engines: expected a comma list of"),
    (["shared-prompt", "--clients", "0", "--model", __file__], "--clients must be between 1 and"),
    (["shared-prompt", "--reps", "0"], "--reps and --system-tokens must be at least 1"),
    (["score", "--reps", "0"], "--reps must be at least 1"),
    (["score", "--model", "missing.gguf"], "--model missing.gguf: no such file"),
    (["score", "--tokens", "4096", "--model", __file__], "--tokens must be between 1 and --n-ctx (2048)"),
])
def test_shared_prompt_and_score_benches_refuse_bad_input_in_one_line(args, message, capsys):
    code, out, err = bench(args, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err
