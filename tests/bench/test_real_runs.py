"""Short real runs on SmolLM2: each in-process engine in its worker, and llama.cpp's HTTP server on loopback."""

import json
import subprocess
import sys
import time
import urllib.request

import pytest

from rz.bench.cli import main
from rz.bench.schema import validate_result

TINY = ["--tests", "pp32,tg4", "--reps-min", "2", "--reps-max", "2", "--warmup", "1", "--threads", "1",
        "--no-bandwidth", "--no-history", "--quiet"]


def run_bench(args, tmp_path, capsys) -> tuple[dict, str]:
    path = tmp_path / "result.json"
    code = main([*args, "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(path.read_text())
    validate_result(result)
    return result, out


@pytest.mark.slow
def test_rz_and_llama_cpp_side_by_side(tmp_path, capsys, smollm2_path):
    result, out = run_bench(["--model", str(smollm2_path), "--engines", "rz,llama.cpp", "--batch", "1,2", *TINY], tmp_path, capsys)
    assert "rz / llama.cpp" in out.splitlines()[0]
    assert {(r["engine"], r["test"]["name"], r["status"]) for r in result["results"]} == {
        (engine, test, "ok") for engine in ("rz", "llama.cpp") for test in ("pp32", "tg4", "tg4 x2")
    }
    assert {r["test"] for r in result["ratios"]} == {"pp32", "tg4", "tg4 x2"}
    engines = {e["name"]: e for e in result["engines"]}
    assert engines["rz"]["description"]["backend"].startswith("jax ")
    for engine in engines.values():
        assert engine["load_seconds"] > 0 and engine["resources"]["peak_rss_bytes"] > 50 << 20
    tg = next(r for r in result["results"] if r["engine"] == "rz" and r["test"]["name"] == "tg4")
    assert tg["latency"]["itl_s"]["n"] >= 2 * 3 and tg["bandwidth"]["achieved_gb_per_s"] > 0


@pytest.mark.slow
def test_llama_cpp_alone_with_depth(tmp_path, capsys, smollm2_path):
    result, _ = run_bench(["--model", str(smollm2_path), "--engines", "llama.cpp", "--depth", "16", *TINY], tmp_path, capsys)
    assert [(r["test"]["name"], r["status"]) for r in result["results"]] == [("pp32 @ d16", "ok"), ("tg4 @ d16", "ok")]
    assert result["engines"][0]["description"]["threads"] == 1


@pytest.mark.slow
def test_rz_at_a_depth_computes_only_the_tokens_after_its_cached_prefix(tmp_path, capsys, smollm2_path):
    result, _ = run_bench(["--model", str(smollm2_path), "--engines", "rz", "--depth", "48", *TINY], tmp_path, capsys)
    assert [(r["test"]["name"], r["status"]) for r in result["results"]] == [("pp32 @ d48", "ok"), ("tg4 @ d48", "ok")]
    pp = result["results"][0]
    # Each repetition (the warm-up's too) reused exactly the 48-token prefix cached before it.
    assert [s["detail"]["cached_tokens"] for s in pp["warmup"] + pp["samples"]] == [[48]] * 3
    assert all(s["seconds"] > 0 for s in pp["samples"])


@pytest.mark.slow
def test_llama_cpp_without_its_extra_buffer_types(tmp_path, capsys, smollm2_path, monkeypatch):
    """RZ_BENCH_LLAMA_EXTRA_BUFTS=0 (for machines where llama.cpp's AMX path crashes) runs, and says so."""
    monkeypatch.setenv("RZ_BENCH_LLAMA_EXTRA_BUFTS", "0")
    result, _ = run_bench(["--model", str(smollm2_path), "--engines", "llama.cpp", *TINY], tmp_path, capsys)
    assert [(r["test"]["name"], r["status"]) for r in result["results"]] == [("pp32", "ok"), ("tg4", "ok")]
    assert result["engines"][0]["description"]["extra_buffer_types"] is False


# `python -m llama_cpp.server`, its models loaded as rz.bench loads llama.cpp's (rz.bench.llamacpp_setup).
SAFE_LLAMA_CPP_SERVER = (
    "import runpy; from rz.bench.llamacpp_setup import use_safe_defaults; use_safe_defaults(); "
    "runpy.run_module('llama_cpp.server', run_name='__main__')"
)


@pytest.fixture
def llama_cpp_server(smollm2_path, free_port, tmp_path):
    """llama-cpp-python's OpenAI-compatible server on loopback, serving SmolLM2 on 1 thread."""
    url = f"http://127.0.0.1:{free_port}"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-c", SAFE_LLAMA_CPP_SERVER, "--model", str(smollm2_path), "--host", "127.0.0.1",
         "--port", str(free_port), "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "512"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.slow
def test_llama_server_over_http(tmp_path, capsys, smollm2_path, llama_cpp_server):
    result, out = run_bench(["--model", str(smollm2_path), "--engines", f"llama-server={llama_cpp_server}", *TINY],
                            tmp_path, capsys)
    assert [(r["test"]["name"], r["status"]) for r in result["results"]] == [("pp32", "ok"), ("tg4", "ok")]
    tg = result["results"][1]
    assert all(s["detail"]["timing"] == "client" for s in tg["samples"]) and tg["latency"]["ttft_s"] is not None

    path = tmp_path / "serving.json"
    code = main(["serve", "--url", llama_cpp_server, "--engine", "llama-server", "--model", str(smollm2_path),
                 "--concurrency", "2", "--requests", "4", "--prompt-tokens", "16", "--max-tokens", "4",
                 "--json", str(path), "--no-history", "--quiet"])
    assert code == 0, capsys.readouterr().out
    serving = json.loads(path.read_text())
    validate_result(serving)
    figures = serving["serving"]
    assert figures["completed"] == 4 and figures["request_throughput"] > 0 and figures["itl_s"]["p99"] > 0


@pytest.mark.slow
def test_wrong_model_on_the_server_fails_preflight(capsys, smollm2_path, llama_cpp_server):
    code = main(["--model", str(smollm2_path), "--engines", f"llama-server={llama_cpp_server}", "--server-model", "other",
                 "--quiet", "--no-history"])
    err = capsys.readouterr().err
    assert code == 2 and "not --server-model 'other'" in err and err.count("\n") == 1
