"""The HTTP engines against small fake servers: same-model checks, timing fields, streamed chunks."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rz.bench.engines.base import EngineSettings
from rz.bench.engines.http_engines import LlamaServerEngine, OllamaEngine
from rz.bench.environment import file_sha256
from rz.bench.errors import PreflightError
from rz.bench.workloads import Prompt, Workload, model_tokenizer


class FakeServer:
    """A loopback HTTP server answering each path from a function of the request body."""

    def __init__(self, routes: dict):
        self.routes = routes
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body):
                outer.requests.append((self.path, body))
                route = outer.routes.get(self.path)
                if route is None:
                    self.send_error(404)
                    return
                reply = route(body)
                if isinstance(reply, list):  # server-sent events
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for event in reply:
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(None)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                self._answer(json.loads(self.rfile.read(length) or b"null"))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(routes):
        servers.append(FakeServer(routes))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def settings(model_path, url, **extra):
    return EngineSettings(model_path=model_path, threads=2, n_ctx=512, url=url, isolated=False, **extra)


def ollama_routes(sha256: str, name="smol:latest"):
    return {
        "/api/tags": lambda _: {"models": [{"name": name}]},
        "/api/show": lambda _: {"modelfile": f"FROM /root/.ollama/models/blobs/sha256-{sha256}\n", "details": {}},
        "/api/generate": lambda body: {
            "prompt_eval_count": 32, "prompt_eval_duration": 64_000_000,
            "eval_count": body["options"]["num_predict"], "eval_duration": body["options"]["num_predict"] * 10_000_000,
            "done_reason": "length",
        },
    }


def test_ollama_is_timed_by_its_own_fields(serve, smollm2_path):
    server = serve(ollama_routes(file_sha256(smollm2_path)))
    engine = OllamaEngine(settings(smollm2_path, server.url, server_model="smol"))
    engine.preflight()
    prompt = [Prompt(ids=(1, 2, 3), text="a b c")]
    pp = engine.run(Workload("pp", n_prompt=32), prompt)
    assert (pp.tokens, pp.seconds) == (32, pytest.approx(0.064)) and pp.tokens_per_second == pytest.approx(500.0)
    tg = engine.run(Workload("tg", n_gen=16), prompt)
    assert (tg.tokens, tg.seconds, tg.tpot_s) == (16, pytest.approx(0.16), pytest.approx(0.01))
    pg = engine.run(Workload("pg", n_prompt=32, n_gen=16), prompt)
    assert (pg.tokens, pg.seconds) == (48, pytest.approx(0.224))
    path, body = server.requests[-1]
    assert path == "/api/generate" and body["raw"] is True and body["options"]["num_thread"] == 2
    assert body["options"]["temperature"] == 0.0 and body["prompt"] == "a b c"
    assert engine.unsupported(Workload("tg", n_gen=8, depth=64)) and engine.unsupported(Workload("tg", n_gen=8, batch=2))


def test_ollama_preflight_names_what_differs(serve, smollm2_path):
    server = serve(ollama_routes("0" * 64))
    with pytest.raises(PreflightError, match="needs --server-model NAME"):
        OllamaEngine(settings(smollm2_path, server.url)).preflight()
    with pytest.raises(PreflightError, match=r"has no model 'llama3'; it has \['smol:latest'\]"):
        OllamaEngine(settings(smollm2_path, server.url, server_model="llama3")).preflight()
    with pytest.raises(PreflightError, match="is a different file"):
        OllamaEngine(settings(smollm2_path, server.url, server_model="smol")).preflight()


def openai_routes(model_id, tokens, chunks=4):
    return {
        "/v1/models": lambda _: {"data": [{"id": model_id}]},
        "/extras/tokenize": lambda body: {"tokens": tokens},
        "/v1/completions": lambda body: [{"choices": [{"text": f" w{i}", "finish_reason": None}]} for i in range(chunks)]
        + [{"choices": [{"text": "", "finish_reason": "length"}]}],
    }


def test_openai_server_streams_are_timed_per_chunk(serve, smollm2_path):
    probe = model_tokenizer(smollm2_path).encode("The quick brown fox jumps over the lazy dog, 1234 times.", add_bos=False)
    server = serve(openai_routes(f"/models/{smollm2_path.name}", probe, chunks=5))
    engine = LlamaServerEngine(settings(smollm2_path, server.url))
    engine.preflight()
    tg = engine.run(Workload("tg", n_gen=4), [Prompt(ids=(1,), text="hello")])
    assert tg.tokens == 4 and len(tg.itl_s) == 4 and tg.ttft_s > 0 and tg.detail["finish_reason"] == "length"
    _, body = server.requests[-1]
    assert body["max_tokens"] == 5 and body["stream"] is True and body["temperature"] == 0.0
    assert body["ignore_eos"] is True and body["cache_prompt"] is False and body["prompt"] == "hello"


def test_openai_preflight_refuses_another_model(serve, smollm2_path):
    server = serve(openai_routes("/models/mistral-7b.Q4_K_M.gguf", [1, 2]))
    with pytest.raises(PreflightError, match=r"serves \['/models/mistral-7b.Q4_K_M.gguf'\], not SmolLM2"):
        LlamaServerEngine(settings(smollm2_path, server.url)).preflight()
    server = serve(openai_routes(smollm2_path.name, [1, 2, 3]))
    with pytest.raises(PreflightError, match="tokenizes text differently"):
        LlamaServerEngine(settings(smollm2_path, server.url)).preflight()


@pytest.mark.parametrize("arrivals", [["--concurrency", "3"], ["--rate", "50"]])
def test_serving_load_and_its_report(arrivals, serve, smollm2_path, tmp_path, capsys):
    from rz.bench.cli import main
    from rz.bench.history import load_results
    from rz.bench.schema import validate_result

    probe = model_tokenizer(smollm2_path).encode("The quick brown fox jumps over the lazy dog, 1234 times.", add_bos=False)
    server = serve(openai_routes(smollm2_path.name, probe, chunks=6))
    history = tmp_path / "history.jsonl"
    code = main(["serve", "--url", server.url, "--model", str(smollm2_path), *arrivals, "--requests", "7",
                 "--prompt-tokens", "12", "--max-tokens", "6", "--history", str(history), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    (result,) = load_results(history)
    validate_result(result)
    figures = result["serving"]
    assert (figures["completed"], figures["failed"]) == (7, 0)
    assert figures["output_token_throughput"] == pytest.approx(6 * figures["request_throughput"])
    assert figures["itl_s"]["n"] == 7 * 5 and figures["tpot_s"]["n"] == 7
    prompts = [body["prompt"] for path, body in server.requests if path == "/v1/completions"]
    assert len(set(prompts)) == 7  # a prompt of its own per request

    code = main(["report", "--history", str(history), "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png")])
    assert code == 0 and "## Serving" in capsys.readouterr().out
