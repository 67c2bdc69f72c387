"""Serving mode: load on a server from N concurrent clients or Poisson arrivals, as users would.

Targets: rz's gRPC server (grpc://HOST:PORT, through rz.client, with token ids both ways) and
any OpenAI-compatible HTTP server (llama-server, llama_cpp.server, Ollama's /v1, ...), each
request a greedy, streamed completion with a prompt of its own, every chunk timed on arrival.
Reported like vLLM's serving benchmark: request and token throughput over the whole run, and
TTFT, TPOT (per request, after the first token), ITL (between chunks) and end-to-end latency.
"""

import random
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rz.bench import stats
from rz.bench.engines.http_engines import PROBE_TEXT, StreamedCompletion, stream_completion
from rz.bench.errors import BenchError, PreflightError
from rz.bench.workloads import Prompt, model_tokenizer


@dataclass(frozen=True)
class Arrivals:
    """Either `concurrency` clients sending back to back, or Poisson arrivals at `rate` requests/s."""

    concurrency: int | None = None
    rate: float | None = None

    def __post_init__(self):
        if (self.concurrency is None) == (self.rate is None):
            raise BenchError("give exactly one of --concurrency N and --rate R")
        if self.concurrency is not None and self.concurrency < 1:
            raise BenchError(f"--concurrency {self.concurrency} is impossible: at least 1 client")
        if self.rate is not None and not self.rate > 0:
            raise BenchError(f"--rate {self.rate} is impossible: requests per second must be positive")

    def as_dict(self) -> dict:
        return {"concurrency": self.concurrency, "rate": self.rate}


class OpenAITarget:
    """An OpenAI-compatible server, checked by the llama-server engine's preflight."""

    def __init__(self, engine):
        self.engine = engine  # an OpenAIServerEngine: its preflight checks the URL and the model
        self.name = engine.name

    def preflight(self) -> None:
        self.engine.preflight()

    @property
    def url(self) -> str:
        return self.engine.url

    @property
    def notes(self) -> list[str]:
        return self.engine.notes

    def stream(self, prompt: Prompt, max_tokens: int) -> StreamedCompletion:
        settings = self.engine.settings
        model = settings.server_model or Path(settings.model_path).name
        return stream_completion(self.engine.url, model, prompt.text, max_tokens, settings.seed, settings.timeout_s)


class GrpcTarget:
    """rz's gRPC server through rz.client: prompts sent as token ids, chunks carrying their token ids."""

    name = "rz-grpc"

    def __init__(self, url: str, model_path: Path, seed: int, timeout_s: float, ready_timeout_s: float = 300.0):
        self.url = url
        self.ready_timeout_s = ready_timeout_s
        self.model_path = Path(model_path)
        self.seed = seed
        self.timeout_s = timeout_s
        self.notes: list[str] = []
        self.client = None

    def preflight(self) -> None:
        from rz.bench.environment import model_facts

        try:
            import grpc

            from rz.client import Client
        except ImportError as error:
            raise PreflightError(f"the gRPC target needs rz's client and grpcio: {error}") from None
        address = self.url.removeprefix("grpc://")
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except (OSError, ValueError) as error:
            raise PreflightError(f"rz server at {self.url} does not answer ({error}): start `python -m rz serve` or fix the URL") from None
        self.client = Client(address, timeout=10.0)
        try:
            self.client.wait_until_serving(timeout=self.ready_timeout_s)
            info = self.client.model_info()
            probe = self.client.tokenize(PROBE_TEXT, add_bos=False)
        except TimeoutError:
            raise PreflightError(f"rz server at {self.url} is not SERVING after {self.ready_timeout_s:g} s (still compiling?)") from None
        except grpc.RpcError as error:
            raise PreflightError(f"rz server at {self.url} failed the preflight ({error.code().name}): {error.details()}") from None
        facts = model_facts(self.model_path)
        if (info.architecture, info.parameters) != (facts["architecture"], facts["parameters"]):
            raise PreflightError(f"rz server at {self.url} serves {info.name} ({info.architecture}, {info.parameters} parameters), "
                                 f"not {self.model_path.name} ({facts['architecture']}, {facts['parameters']})")
        if list(probe) != model_tokenizer(self.model_path).encode(PROBE_TEXT, add_bos=False):
            raise PreflightError(f"rz server at {self.url} tokenizes text differently from {self.model_path.name}")
        self.client.timeout = self.timeout_s

    def stream(self, prompt: Prompt, max_tokens: int) -> StreamedCompletion:
        import grpc

        started = time.perf_counter()
        arrivals, tokens, finish_reason, timings = [], [], None, None
        try:
            for chunk in self.client.stream(list(prompt.ids), max_tokens, temperature=0.0, ignore_eos=True, seed=self.seed):
                if chunk.token_ids:
                    arrivals.append(chunk.received_at)
                    tokens.append(len(chunk.token_ids))
                finish_reason = chunk.finish_reason or finish_reason
                timings = chunk.timings or timings
        except grpc.RpcError as error:
            raise BenchError(f"rz server at {self.url}: {error.code().name}: {error.details()}") from None
        return StreamedCompletion(started, arrivals, finish_reason, timings, tokens)


@dataclass
class _Outcome:
    prompt_tokens: int
    stream: StreamedCompletion | None = None
    finished: float = 0.0
    error: str | None = None


def run_serving(target, prompts: list[Prompt], max_tokens: int, arrivals: Arrivals, seed: int = 0, progress=None) -> dict:
    """Send every prompt as one request under the arrival pattern; the `serving` section of a result."""
    outcomes = [_Outcome(prompt_tokens=len(p.ids)) for p in prompts]

    def send(index: int) -> None:
        outcome = outcomes[index]
        try:
            outcome.stream = target.stream(prompts[index], max_tokens)
            if not outcome.stream.arrivals:
                outcome.error = "no tokens streamed"
        except BenchError as error:
            outcome.error = str(error)
        outcome.finished = time.perf_counter()
        if progress is not None:
            done = sum(o.finished > 0 for o in outcomes)
            progress.update(f"[{target.name}] serving  {done}/{len(outcomes)} requests")

    began = time.perf_counter()
    if arrivals.concurrency is not None:
        _closed_loop(send, len(prompts), arrivals.concurrency)
    else:
        _poisson(send, len(prompts), arrivals.rate, random.Random(seed))
    return _summarize(target, arrivals, outcomes, began)


def _closed_loop(send, n_requests: int, clients: int) -> None:
    """`clients` threads, each sending its next request as soon as the previous one finished."""
    lock = threading.Lock()
    pending = iter(range(n_requests))

    def client() -> None:
        while True:
            with lock:
                index = next(pending, None)
            if index is None:
                return
            send(index)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(min(clients, n_requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _poisson(send, n_requests: int, rate: float, rng: random.Random) -> None:
    """Requests started at exponentially distributed intervals, each on its own thread."""
    threads = []
    next_at = time.perf_counter()
    for index in range(n_requests):
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        thread = threading.Thread(target=send, args=(index,), daemon=True)
        thread.start()
        threads.append(thread)
        next_at += rng.expovariate(rate)
    for thread in threads:
        thread.join()


def _summarize(target, arrivals: Arrivals, outcomes: list[_Outcome], began: float) -> dict:
    done = [o for o in outcomes if o.error is None]
    streams = [o.stream for o in done]
    duration = max((o.finished for o in outcomes), default=began) - began
    output_tokens = sum(s.n_tokens for s in streams)
    prompt_tokens = sum(o.prompt_tokens for o in done)
    per_second = (lambda count: count / duration) if duration > 0 else (lambda count: 0.0)
    return {
        "url": target.url,
        "engine": target.name,
        "arrivals": arrivals.as_dict(),
        "requests": len(outcomes),
        "completed": len(done),
        "failed": len(outcomes) - len(done),
        "duration_s": duration,
        "request_throughput": per_second(len(done)),
        "output_token_throughput": per_second(output_tokens),
        "total_token_throughput": per_second(output_tokens + prompt_tokens),
        "ttft_s": stats.latency_summary([s.arrivals[0] - s.started for s in streams]),
        "tpot_s": stats.latency_summary([(s.arrivals[-1] - s.arrivals[0]) / (s.n_tokens - 1) for s in streams if s.n_tokens > 1]),
        "itl_s": stats.latency_summary([b - a for s in streams for a, b in zip(s.arrivals, s.arrivals[1:])]),
        "e2e_s": stats.latency_summary([s.arrivals[-1] - s.started for s in streams]),
        "errors": sorted({o.error for o in outcomes if o.error})[:10],
    }
