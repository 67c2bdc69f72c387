"""Engines behind a URL: an OpenAI-compatible server (llama-server, llama_cpp.server) and Ollama.

An OpenAI-compatible server is timed on the client from its token stream: what a user of the
server sees, HTTP included. Ollama is timed by the fields it reports itself (prompt_eval_count
and _duration, eval_count and _duration), the figures `ollama run --verbose` prints. Neither can
be handed a KV cache at a depth, and neither runs a batch of our sequences (that is `serve`).
"""

import re
import time
from dataclasses import dataclass
from pathlib import Path

from rz.bench.engines.base import Engine, Sample
from rz.bench.errors import BenchError, PreflightError
from rz.bench.http import check_url, post_json, post_stream, reachable
from rz.bench.workloads import Prompt, Workload, model_tokenizer

PROBE_TEXT = "The quick brown fox jumps over the lazy dog, 1234 times."


class _HttpEngine(Engine):
    kind = "http"

    def __init__(self, settings):
        super().__init__(settings)
        self.url = None
        self.notes: list[str] = []

    def unsupported(self, test: Workload) -> str | None:
        if test.depth:
            return f"{self.name} cannot be given a KV cache holding {test.depth} tokens"
        if test.batch > 1:
            return f"{self.name} decodes one request here; measure concurrent requests with `python -m rz.bench serve`"
        return None

    def resources(self) -> dict:
        return {"peak_rss_bytes": None}


class OpenAIServerEngine(_HttpEngine):
    """An OpenAI-compatible /v1/completions server, streamed and timed on the client."""

    name = "openai"

    def preflight(self) -> None:
        self.url = check_url(self.settings.url, self.name)
        listing = reachable(self.url, "/v1/models", self.name)
        served = [str(entry.get("id", "")) for entry in listing.get("data", [])]
        ours = Path(self.settings.model_path)
        wanted = self.settings.server_model
        if wanted is not None:
            if served and wanted not in served:
                raise PreflightError(f"{self.name} at {self.url} serves {served}, not --server-model {wanted!r}")
        elif served and not any(_same_file_name(name, ours) for name in served):
            raise PreflightError(
                f"{self.name} at {self.url} serves {served}, not {ours.name} "
                "(start it on the same GGUF file, or name its model with --server-model)"
            )
        self._check_tokenizer()
        self.notes.append("threads: not reported by the server; start it with the same --threads")

    def _check_tokenizer(self) -> None:
        """The server must split text into the same token ids as the model file (same vocabulary)."""
        expected = model_tokenizer(self.settings.model_path).encode(PROBE_TEXT, add_bos=False)
        for path, body in (("/tokenize", {"content": PROBE_TEXT}), ("/extras/tokenize", {"input": PROBE_TEXT})):
            try:
                tokens = post_json(self.url + path, body, timeout=10.0).get("tokens")
            except BenchError:
                continue
            if tokens is None:
                continue
            tokens = [t["id"] if isinstance(t, dict) else t for t in tokens]
            if tokens[-len(expected):] != expected:
                raise PreflightError(f"{self.name} at {self.url} tokenizes text differently from {Path(self.settings.model_path).name}: not the same model")
            return
        self.notes.append("tokenizer: the server has no tokenize endpoint; same model checked by name only")

    def describe(self) -> dict:
        return {"version": None, "backend": "http (client-side timing)", "url": self.url or self.settings.url,
                "threads": None, "notes": list(self.notes)}

    def run(self, test: Workload, prompts: list[Prompt]) -> Sample:
        model = self.settings.server_model or Path(self.settings.model_path).name
        stream = stream_completion(self.url, model, prompts[0].text, test.max_tokens, self.settings.seed, self.settings.timeout_s)
        started, arrivals, finish_reason = stream.started, stream.arrivals, stream.finish_reason
        if not arrivals:
            raise BenchError(f"{self.name} at {self.url} streamed no text for {test.name}")
        first, last = arrivals[0], arrivals[-1]
        generated = len(arrivals)
        detail = {"completion_chunks": generated, "finish_reason": finish_reason, "timing": "client"}
        if stream.server_timings:
            detail["server_timings"] = stream.server_timings
        if test.kind == "pp":
            return Sample(seconds=first - started, tokens=test.tokens_counted, ttft_s=first - started, detail=detail)
        if generated < 2:
            raise BenchError(f"{self.name} at {self.url} stopped after one token in {test.name} (finish: {finish_reason})")
        decode = last - first
        tokens = generated - 1 if test.kind == "tg" else test.n_prompt + generated - 1
        return Sample(
            seconds=decode if test.kind == "tg" else last - started, tokens=tokens, ttft_s=first - started,
            tpot_s=decode / (generated - 1), itl_s=[b - a for a, b in zip(arrivals, arrivals[1:])], detail=detail,
        )


@dataclass
class StreamedCompletion:
    """When a streamed completion started and when each chunk of text arrived (perf_counter seconds)."""

    started: float
    arrivals: list[float]
    finish_reason: str | None
    server_timings: dict | None = None
    tokens: list[int] | None = None  # tokens in each chunk, when the server says (else one each)

    @property
    def n_tokens(self) -> int:
        return sum(self.tokens) if self.tokens is not None else len(self.arrivals)


def stream_completion(url: str, model: str, prompt: str, max_tokens: int, seed: int, timeout: float) -> StreamedCompletion:
    """POST a greedy, streamed /v1/completions request and time its chunks of text."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "top_k": 1,
        "seed": seed,
        "stream": True,
        "ignore_eos": True,  # llama-server; others ignore unknown fields
        "cache_prompt": False,  # llama-server would otherwise answer a repeated prefix from cache
    }
    started = time.perf_counter()
    arrivals = []
    finish_reason = None
    server_timings = None
    for arrived, event in post_stream(url + "/v1/completions", body, timeout=timeout):
        choice = (event.get("choices") or [{}])[0]
        if choice.get("text"):
            arrivals.append(arrived)
        finish_reason = choice.get("finish_reason") or finish_reason
        server_timings = event.get("timings") or server_timings
    return StreamedCompletion(started, arrivals, finish_reason, server_timings)


class LlamaServerEngine(OpenAIServerEngine):
    """llama.cpp's HTTP server (llama-server, or llama-cpp-python's `python -m llama_cpp.server`)."""

    name = "llama-server"


class OllamaEngine(_HttpEngine):
    """Ollama's /api/generate, timed by the durations Ollama reports."""

    name = "ollama"

    def preflight(self) -> None:
        from rz.bench.environment import file_sha256, model_facts

        self.url = check_url(self.settings.url, self.name)
        listing = reachable(self.url, "/api/tags", self.name)
        names = [m.get("name", "") for m in listing.get("models", [])]
        wanted = self.settings.server_model
        if not wanted:
            raise PreflightError(f"engine ollama needs --server-model NAME: one of {names or 'its models (it has none)'}")
        if wanted not in names and f"{wanted}:latest" not in names:
            raise PreflightError(f"ollama at {self.url} has no model {wanted!r}; it has {names} (ollama create/pull it)")
        show = post_json(self.url + "/api/show", {"model": wanted}, timeout=30.0)
        digest = re.search(r"sha256[-:]([0-9a-f]{64})", show.get("modelfile", ""))
        ours = Path(self.settings.model_path)
        if digest:
            if digest[1] != file_sha256(ours):
                raise PreflightError(f"ollama's {wanted} is a different file (sha256 {digest[1][:12]}…) from {ours.name}")
            return
        details, facts = show.get("details", {}), model_facts(ours)
        if (details.get("quantization_level"), details.get("family")) != (facts["quantization"], facts["architecture"]):
            raise PreflightError(
                f"ollama's {wanted} is {details.get('family')} {details.get('quantization_level')}, "
                f"not {facts['architecture']} {facts['quantization']} like {ours.name}"
            )
        self.notes.append("same model checked by family and quantization (no blob digest in /api/show)")

    def describe(self) -> dict:
        return {"version": None, "backend": "http (Ollama's timing fields)", "url": self.url or self.settings.url,
                "model": self.settings.server_model, "threads": self.settings.threads, "notes": list(self.notes)}

    def run(self, test: Workload, prompts: list[Prompt]) -> Sample:
        n_predict = 1 if test.kind == "pp" else test.n_gen
        reply = post_json(self.url + "/api/generate", {
            "model": self.settings.server_model,
            "prompt": prompts[0].text,
            "raw": True,
            "stream": False,
            "keep_alive": "30m",
            "options": {"num_predict": n_predict, "temperature": 0.0, "top_k": 1, "seed": self.settings.seed,
                        "num_thread": self.settings.threads, "num_ctx": self.settings.n_ctx},
        }, timeout=self.settings.timeout_s)
        try:
            prompt_n, prompt_s = reply["prompt_eval_count"], reply["prompt_eval_duration"] / 1e9
            eval_n, eval_s = reply.get("eval_count", 0), reply.get("eval_duration", 0) / 1e9
        except (KeyError, TypeError):
            raise BenchError(f"ollama at {self.url} gave no timing fields for {test.name}: {str(reply)[:200]}") from None
        detail = {"prompt_eval_count": prompt_n, "eval_count": eval_n, "timing": "ollama", "done_reason": reply.get("done_reason")}
        if test.kind == "pp":
            return Sample(seconds=prompt_s, tokens=prompt_n, detail=detail)
        tpot = eval_s / eval_n if eval_n else None
        if test.kind == "tg":
            return Sample(seconds=eval_s, tokens=eval_n, tpot_s=tpot, detail=detail)
        return Sample(seconds=prompt_s + eval_s, tokens=prompt_n + eval_n, ttft_s=prompt_s, tpot_s=tpot, detail=detail)


def _same_file_name(served: str, ours: Path) -> bool:
    name = Path(served).name
    return name in (ours.name, ours.stem)
