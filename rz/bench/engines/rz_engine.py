"""rz in process, through rz.LLM: generate() for prompts and batches, stream() for per-token times.

A test at a depth starts, as llama-bench's, from a KV cache holding the prompt's first `depth`
tokens: the prefix cache is emptied, the prefix alone is prefilled into it untimed, and the timed
request reuses it (rz's prefix reuse), so that only its last N tokens are computed. (Timing the
whole prompt less the prefix alone, two requests of seconds each, left the N tokens' share
within their noise: a repetition could measure a negative time.)
"""

import time
from pathlib import Path

from rz.bench.engines.base import Engine, Sample, pin_threads, usable_cores
from rz.bench.errors import BenchError, PreflightError
from rz.bench.workloads import Prompt, Workload

# cache_prompt off: a test times the prompt's computation (a repetition would otherwise find the
# last one's prompt in the cache); llama.cpp's engines start each request from an empty cache too.
_GREEDY = {"temperature": 0.0, "ignore_eos": True, "seed": 0, "cache_prompt": False}
# A test at a depth: its prefix is cached first, and the timed request maps it.
_AFTER_PREFIX = {**_GREEDY, "cache_prompt": True}


class RzEngine(Engine):
    """rz.LLM on the JAX backend it finds (CPU threads pinned to --threads when isolated)."""

    name = "rz"
    kind = "in-process"

    def __init__(self, settings):
        super().__init__(settings)
        self.llm = None
        self.threads = None

    def preflight(self) -> None:
        from rz.config import ModelConfig
        from rz.errors import RzError
        from rz.gguf import GGUFFile

        path = Path(self.settings.model_path)
        if not path.is_file():
            raise PreflightError(f"model file {path} does not exist")
        try:
            with GGUFFile(path) as gguf:
                ModelConfig.from_gguf(gguf)
        except RzError as error:
            raise PreflightError(f"rz cannot run {path.name}: {error}") from None

    def load(self) -> dict:
        if self.settings.isolated:
            self.threads = pin_threads(self.settings.threads)
        import rz

        started = time.perf_counter()
        self.llm = rz.LLM(
            self.settings.model_path, n_ctx=self.settings.n_ctx, max_batch=self.settings.max_batch,
            cache_type_k=self.settings.cache_type_k, cache_type_v=self.settings.cache_type_v,
        )
        return {"load_seconds": getattr(self.llm, "load_seconds", time.perf_counter() - started)}

    def describe(self) -> dict:
        import jax

        import rz

        backend = jax.default_backend()
        return {
            "version": f"rz {rz.__version__}",
            "backend": f"jax {backend}",
            "devices": [str(device) for device in jax.devices()],
            # XLA's CPU thread pool takes every core the process may use.
            "threads": (self.threads or usable_cores()) if backend == "cpu" else None,
            "n_ctx": self.settings.n_ctx,
            "max_batch": self.settings.max_batch,
        }

    def unsupported(self, test: Workload) -> str | None:
        if test.batch > self.settings.max_batch:
            return f"batch {test.batch} is above --max-batch {self.settings.max_batch}"
        return None

    def resources(self) -> dict:
        compilations = dict(getattr(self.llm, "compilations", {}) or {})
        return super().resources() | {"compile_seconds": compilations}

    # ----- one repetition -----

    def run(self, test: Workload, prompts: list[Prompt]) -> Sample:
        if test.kind == "pp":
            return self._prompt(test, prompts)
        if test.batch > 1:
            return self._batch(test, prompts)
        return self._stream(test, prompts[0])

    def _prompt(self, test: Workload, prompts: list[Prompt]) -> Sample:
        """Prompt processing (with its first sampled token); at a depth, of the tokens after it."""
        options = self._depth_prefix_cached(test, prompts)
        started = time.perf_counter()
        completions = self.llm.generate([list(p.ids) for p in prompts], max_tokens=1, **options)
        seconds = time.perf_counter() - started
        cached = [c.usage["cached_tokens"] for c in completions]
        return Sample(seconds=seconds, tokens=test.tokens_counted, ttft_s=None if test.depth else seconds,
                      detail={"cached_tokens": cached} if test.depth else {})

    def _depth_prefix_cached(self, test: Workload, prompts: list[Prompt]) -> dict:
        """At a depth, prefills the prompts' first `depth` tokens, untimed, into an emptied prefix
        cache; returns the timed request's options (which map that prefix, so that it computes only
        the rest)."""
        if not test.depth:
            return _GREEDY
        self.llm._scheduler(len(prompts)).engine.blocks.clear_cache()
        self.llm.generate([list(p.ids[: test.depth]) for p in prompts], max_tokens=1, **_AFTER_PREFIX)
        return _AFTER_PREFIX

    def _stream(self, test: Workload, prompt: Prompt) -> Sample:
        """One sequence through stream(): the time of every piece of text as it arrives."""
        options = self._depth_prefix_cached(test, [prompt])
        started = time.perf_counter()
        arrivals = []
        for _ in self.llm.stream(list(prompt.ids), max_tokens=test.max_tokens, **options):
            arrivals.append(time.perf_counter())
        finished = time.perf_counter()
        if not arrivals:
            raise BenchError(f"rz streamed no text for {test.name}")
        first = arrivals[0]
        decode = finished - first
        if test.kind == "tg":
            seconds = decode
        else:
            seconds = finished - started
        return Sample(
            seconds=seconds, tokens=test.tokens_counted, ttft_s=first - started, tpot_s=decode / test.n_gen,
            itl_s=[b - a for a, b in zip(arrivals, arrivals[1:])],
            detail={"pieces": len(arrivals)},
        )

    def _batch(self, test: Workload, prompts: list[Prompt]) -> Sample:
        """Sequences decoding together: from the last first token to the last token, by rz's own timings."""
        completions = self.llm.generate([list(p.ids) for p in prompts], max_tokens=test.max_tokens, **_GREEDY)
        produced = [c.usage["completion_tokens"] for c in completions]
        if any(n != test.max_tokens for n in produced):
            raise BenchError(f"rz generated {produced} tokens per sequence for {test.name}, not {test.max_tokens}")
        first_tokens = [c.timings["time_to_first_token_seconds"] for c in completions]
        decode = max(c.timings["total_seconds"] for c in completions) - max(first_tokens)
        return Sample(
            seconds=decode, tokens=test.tokens_counted, ttft_s=max(first_tokens), tpot_s=decode / test.n_gen,
        )

    def close(self) -> None:
        self.llm = None
