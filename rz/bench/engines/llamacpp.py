"""llama.cpp in process, through llama-cpp-python's C API: what llama-bench does, with real sampling.

The high-level llama_cpp.Llama re-uses a matching prompt prefix and copies logits into NumPy on
every call; the C API gives the bare cost: llama_decode on batches of tokens and llama.cpp's own
greedy sampler, one context per batch size with one KV-cache stream per sequence.
"""

import ctypes
import time
from pathlib import Path

from gguf import GGMLQuantizationType

from rz.bench.engines.base import Engine, Sample
from rz.bench.errors import BenchError, PreflightError
from rz.bench.llamacpp_setup import extra_buffer_types
from rz.bench.workloads import Prompt, Workload

_LOG_ERRORS: list[str] = []


def _import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        raise PreflightError("engine llama.cpp needs llama-cpp-python: pip install llama-cpp-python") from error
    return llama_cpp


def _silence_logs(llama_cpp) -> None:
    """Keep llama.cpp's log lines off the terminal, holding on to errors for messages."""
    if getattr(_silence_logs, "callback", None) is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if level == 3:  # GGML_LOG_LEVEL_ERROR
            _LOG_ERRORS.append(text.decode("utf-8", "replace").strip())

    _silence_logs.callback = callback  # a reference must outlive every call from C
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))




class LlamaCppEngine(Engine):
    """llama.cpp through llama-cpp-python, CPU threads as set, greedy sampling, EOS ignored."""

    name = "llama.cpp"
    kind = "in-process"

    def __init__(self, settings):
        super().__init__(settings)
        self._lib = None
        self._model = None
        self._contexts: dict[int, tuple] = {}  # batch size -> (context, batch buffer, sampler)

    def preflight(self) -> None:
        _import_llama_cpp()
        if not Path(self.settings.model_path).is_file():
            raise PreflightError(f"model file {self.settings.model_path} does not exist")

    def load(self) -> dict:
        llama_cpp = self._lib = _import_llama_cpp()
        _silence_logs(llama_cpp)
        started = time.perf_counter()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.use_extra_bufts = extra_buffer_types()
        self._model = llama_cpp.llama_model_load_from_file(str(self.settings.model_path).encode(), params)
        if not self._model:
            raise PreflightError(f"llama.cpp cannot load {self.settings.model_path}: {_last_error()}")
        self._context(1)
        return {"load_seconds": time.perf_counter() - started}

    def describe(self) -> dict:
        llama_cpp = _import_llama_cpp()
        info = {
            "version": f"llama-cpp-python {llama_cpp.__version__}",
            "backend": "cpu",
            "threads": self.settings.threads,
            "n_batch": self.settings.n_batch,
            "n_ubatch": min(self.settings.n_batch, 512),
            "flash_attn": "auto (llama.cpp default)",
            "extra_buffer_types": extra_buffer_types(),
        }
        if self._lib is not None:
            info["system_info"] = self._lib.llama_print_system_info().decode("utf-8", "replace").strip()
        return info

    def unsupported(self, test: Workload) -> str | None:
        if test.batch > self.settings.max_batch:
            return f"batch {test.batch} is above --max-batch {self.settings.max_batch}"
        return None

    # ----- one repetition -----

    def run(self, test: Workload, prompts: list[Prompt]) -> Sample:
        lib = self._lib
        ctx, batch, sampler = self._context(test.batch)
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        lib.llama_sampler_reset(sampler)
        depth = test.depth
        for sequence, prompt in enumerate(prompts):
            if depth and test.kind != "tg":
                self._decode_prompt(ctx, batch, prompt.ids[:depth], sequence, 0, want_logits=False)
        started = time.perf_counter()
        tokens = []
        for sequence, prompt in enumerate(prompts):
            start = depth if test.kind != "tg" else 0
            self._decode_prompt(ctx, batch, prompt.ids[start:], sequence, start, want_logits=True)
            tokens.append(lib.llama_sampler_sample(sampler, ctx, -1))
        first_token_at = time.perf_counter()
        if test.kind == "pp":
            return Sample(seconds=first_token_at - started, tokens=test.tokens_counted, ttft_s=first_token_at - started)
        token_times = [first_token_at]
        positions = [len(p.ids) for p in prompts]
        for _ in range(test.n_gen):
            _fill(batch, [(token, position, sequence, True) for sequence, (token, position) in enumerate(zip(tokens, positions))])
            self._decode(ctx, batch)
            tokens = [lib.llama_sampler_sample(sampler, ctx, i) for i in range(len(prompts))]
            positions = [p + 1 for p in positions]
            token_times.append(time.perf_counter())
        finished = token_times[-1]
        decode = finished - first_token_at
        itl = [b - a for a, b in zip(token_times, token_times[1:])] if test.batch == 1 else []
        seconds = decode if test.kind == "tg" else finished - started
        return Sample(
            seconds=seconds, tokens=test.tokens_counted, ttft_s=first_token_at - started,
            tpot_s=decode / test.n_gen, itl_s=itl,
        )

    def _decode_prompt(self, ctx, batch, ids, sequence: int, start: int, want_logits: bool) -> None:
        """Decode a prompt in chunks of n_batch tokens; logits only for its last token."""
        n_batch = self.settings.n_batch
        for offset in range(0, len(ids), n_batch):
            chunk = ids[offset : offset + n_batch]
            last = offset + len(chunk) == len(ids)
            _fill(batch, [(t, start + offset + i, sequence, want_logits and last and i == len(chunk) - 1) for i, t in enumerate(chunk)])
            self._decode(ctx, batch)

    def _decode(self, ctx, batch) -> None:
        status = self._lib.llama_decode(ctx, batch)
        if status != 0:
            raise BenchError(f"llama_decode failed with status {status}: {_last_error() or 'no message from llama.cpp'}")

    def _context(self, n_sequences: int):
        """The context for n_sequences decoding together: n_ctx positions for each, one KV stream each."""
        if n_sequences in self._contexts:
            return self._contexts[n_sequences]
        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = self.settings.n_ctx * n_sequences
        params.n_batch = max(self.settings.n_batch, n_sequences)
        params.n_ubatch = min(params.n_batch, 512)
        params.n_seq_max = n_sequences
        # gguf-py's type numbers: rz_kernels' would import JAX into this worker, whose RSS is measured.
        params.type_k = int(GGMLQuantizationType[self.settings.cache_type_k.upper()])
        params.type_v = int(GGMLQuantizationType[self.settings.cache_type_v.upper()])
        params.n_threads = params.n_threads_batch = self.settings.threads
        params.no_perf = True
        ctx = lib.llama_init_from_model(self._model, params)
        if not ctx:
            raise BenchError(f"llama.cpp cannot create a context of {params.n_ctx} positions: {_last_error()}")
        batch = lib.llama_batch_init(params.n_batch, 0, 1)
        sampler = lib.llama_sampler_init_greedy()
        self._contexts[n_sequences] = (ctx, batch, sampler)
        return self._contexts[n_sequences]

    def close(self) -> None:
        if self._lib is None:
            return
        for ctx, batch, sampler in self._contexts.values():
            self._lib.llama_sampler_free(sampler)
            self._lib.llama_batch_free(batch)
            self._lib.llama_free(ctx)
        self._contexts.clear()
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None


def _fill(batch, entries: list[tuple[int, int, int, bool]]) -> None:
    """Write (token, position, sequence, wants logits) rows into a llama_batch."""
    batch.n_tokens = len(entries)
    for i, (token, position, sequence, logits) in enumerate(entries):
        batch.token[i] = token
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = sequence
        batch.logits[i] = logits


def _last_error() -> str:
    return _LOG_ERRORS[-1] if _LOG_ERRORS else ""
