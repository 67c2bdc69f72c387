"""The multi-turn chat workload of `python -m rz.bench chat`."""

from rz.bench.chat import conversation, measure, table
from rz.kv_cache import BLOCK_SIZE


def _words(text: str) -> list[int]:
    return [len(word) for word in text.split()]


def _render(messages: list[dict]) -> list[int]:
    return [token for message in messages for token in [0, *_words(message["content"])]]


def test_each_turn_extends_the_last():
    turns = conversation(_words, _render, 3, user_tokens=5, answer_tokens=3)
    assert all(len(later) > len(earlier) and later[: len(earlier)] == earlier for earlier, later in zip(turns, turns[1:]))


def test_a_warm_chat_warms_up_first_and_reuses_each_turn(smollm2_path):
    progress = []
    result = measure(smollm2_path, 2, 40, 4, 256, 2, ("rz",), progress.append, warm=True)
    assert result["warm"] and len(result["ttft_s"]["rz"]) == 2
    assert progress[0].startswith("rz warmed up")
    # The second turn reuses the first's prompt: every whole block of it (the cache reuses blocks).
    assert result["prompt_tokens"][0] >= BLOCK_SIZE
    assert result["cached_tokens"]["rz"][1] >= result["prompt_tokens"][0] // BLOCK_SIZE * BLOCK_SIZE
    assert "| 2 |" in table(result)


def test_repeated_chats_start_from_empty_caches_and_report_medians(smollm2_path):
    result = measure(smollm2_path, 2, 40, 4, 256, 2, ("rz",), lambda _: None, repeats=3)
    samples = result["ttft_samples_s"]["rz"]
    assert result["repeats"] == 3 and [len(turn) for turn in samples] == [3, 3]
    assert result["ttft_s"]["rz"] == [sorted(turn)[1] for turn in samples]
    assert result["cached_tokens"]["rz"][0] == 0  # every run's first turn found nothing cached (measure checks them)


class _FakeServer:
    """An OpenAI-style streaming /v1/completions that records each request and reports reuse as
    rz does (usage.prompt_tokens_details) or as llama-server does (timings.prompt_n)."""

    def __init__(self, style: str):
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies, held = [], []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler):
                body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
                self.bodies.append(body)
                ids = body["prompt"]
                reused = next((i for i, (a, b) in enumerate(zip(held, ids[:-1])) if a != b), min(len(held), len(ids) - 1))
                held[:] = ids
                if style == "rz":
                    events = [{"choices": [{"text": "x"}]}, {"choices": [], "usage": {"prompt_tokens_details": {"cached_tokens": reused}}}]
                else:
                    events = [{"choices": [{"text": "x"}], "timings": {"prompt_n": len(ids) - reused}}]
                handler.send_response(200)
                handler.send_header("Content-Type", "text/event-stream")
                handler.end_headers()
                for event in events:
                    handler.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                handler.wfile.write(b"data: [DONE]\n\n")

            def log_message(handler, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_the_chat_through_servers_sends_token_ids_and_reads_each_servers_reuse(smollm2_path):
    from rz.bench.chat import measure_servers

    servers = {"rz": _FakeServer("rz"), "llama-server": _FakeServer("llama")}
    result = measure_servers(smollm2_path, {name: s.url for name, s in servers.items()}, 3, 8, 4, lambda message: None)
    for name, server in servers.items():
        server.server.shutdown()
        assert [len(body["prompt"]) for body in server.bodies] == result["prompt_tokens"]
        assert all(body["cache_prompt"] and body["stream"] and body["max_tokens"] == 1 for body in server.bodies)
        assert len(result["ttft_s"][name]) == 3 and all(t > 0 for t in result["ttft_s"][name])
        # Each turn extends the last: all of the previous prompt is reported reused.
        assert result["cached_tokens"][name] == [0, *result["prompt_tokens"][:-1]]
    assert servers["rz"].bodies[2]["prompt"] == servers["llama-server"].bodies[2]["prompt"]
    assert "| 3 |" in table(result)
