"""A soak: 2,000 mixed requests from 8 concurrent clients (issue 17). gRPC streams and unary
calls, OpenAI chat completions over HTTP (streamed, or not with n of 1 or 2), prompts that share a long system
prompt or a prefix with earlier ones, random cancellations and deadlines. No unexpected
error, the KV cache serves shared prefixes throughout, every slot is free at the end, and the
server's resident memory does not grow after warm-up.

Generations are one or two tokens, so the run is mostly admissions and departures, the
bookkeeping a leak would come from, and fits in a few minutes on two cores."""

import random
import threading

import grpc
import openai
import pytest

from server_process import wait_for
from test_server import _metric

pytestmark = pytest.mark.slow

N_REQUESTS = 2000
N_CLIENTS = 8
BASELINE_AFTER = 200
_WORDS = "river stone garden window music story morning island forest bridge silver paper engine".split()
_SYSTEM = "You are a careful assistant for a museum of rivers and mills. " * 6


def _words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))


def test_soak(server):
    lock = threading.Lock()
    issued = [0]
    finished = [0]
    unexpected = []
    rss = {}
    before = server.metrics()

    def next_index():
        with lock:
            if issued[0] == N_REQUESTS:
                return None
            issued[0] += 1
            return issued[0]

    def done():
        with lock:
            finished[0] += 1
            if finished[0] == BASELINE_AFTER:
                rss["baseline"] = server.metrics()[("process_resident_memory_bytes", ())]

    def grpc_request(client, rng, index):
        prompt = _words(rng, 1, 30)
        action = rng.random()
        timeout = rng.uniform(0.05, 1.0) if action < 0.1 else None
        options = {"temperature": rng.choice([0.0, 0.8]), "seed": index, "timeout": timeout}
        try:
            stream = client.stream(prompt, rng.randint(1, 2), **options)
            if action > 0.9:  # the client walks away after the first message
                next(stream)
                stream.close()
            elif (reason := list(stream)[-1].finish_reason) not in ("stop", "length"):
                unexpected.append(f"request {index}: finish reason {reason}")
        except grpc.RpcError as error:
            if not (timeout is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                unexpected.append(f"request {index}: {error.code().name}: {error.details()}")

    def http_request(client, rng, index):
        messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _words(rng, 1, 12)}]
        options = {"model": "any", "messages": messages, "max_tokens": rng.randint(1, 2), "seed": index,
                   "temperature": rng.choice([0.0, 0.8])}
        try:
            if rng.random() < 0.5:
                chunks = list(client.chat.completions.create(stream=True, **options))
                reasons = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
            else:
                reply = client.chat.completions.create(n=rng.choice([1, 1, 2]), **options)
                reasons = [choice.finish_reason for choice in reply.choices]
            if not reasons or any(reason not in ("stop", "length") for reason in reasons):
                unexpected.append(f"request {index}: finish reasons {reasons}")
        except openai.OpenAIError as error:
            unexpected.append(f"request {index}: {type(error).__name__}: {error}")

    def client_thread(seed):
        rng = random.Random(seed)
        http = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=120)
        with server.client() as client:
            while (index := next_index()) is not None:
                if rng.random() < 0.3:
                    http_request(http, rng, index)
                else:
                    grpc_request(client, rng, index)
                done()

    threads = [threading.Thread(target=client_thread, args=(seed,)) for seed in range(N_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not unexpected, unexpected[:10]
    # Walked-away streams finish on the server after their clients have left.
    wait_for(lambda: _metric(server.metrics(), "rz_active_slots") == 0, timeout=60)
    after = server.metrics()
    assert _metric(after, "rz_queued_requests") == 0
    # The shared system prompt and repeated prefixes were served from the cache.
    cached = _metric(after, "rz_prompt_tokens_cached_total") - _metric(before, "rz_prompt_tokens_cached_total")
    prompt = _metric(after, "rz_prompt_tokens_total") - _metric(before, "rz_prompt_tokens_total")
    assert cached > 0.3 * prompt, f"only {cached:.0f} of {prompt:.0f} prompt tokens came from the cache"
    resident = after[("process_resident_memory_bytes", ())]
    assert resident <= 1.10 * rss["baseline"], f"resident memory grew from {rss['baseline']:.3e} to {resident:.3e} bytes"
