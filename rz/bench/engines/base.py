"""What every engine gives the runner: preflight, load, one timed repetition, its resources."""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rz.bench.environment import proc_bytes
from rz.bench.workloads import Prompt, Workload


@dataclass(frozen=True)
class EngineSettings:
    """The settings every engine is run with; the same on both sides of a comparison."""

    model_path: Path
    threads: int
    n_ctx: int
    max_batch: int = 1
    n_batch: int = 512  # llama.cpp's logical batch for prompt processing
    cache_type_k: str = "f16"  # KV cache types (llama.cpp's names), the same for every engine
    cache_type_v: str = "f16"
    seed: int = 0
    url: str | None = None  # HTTP engines
    server_model: str | None = None  # the model name an HTTP server is asked for (Ollama's tag)
    isolated: bool = True  # running in a worker process of its own
    timeout_s: float = 600.0


@dataclass
class Sample:
    """One timed repetition: `tokens` processed in `seconds`, and the latencies it showed."""

    seconds: float
    tokens: int
    ttft_s: float | None = None  # time to first token, from the request
    tpot_s: float | None = None  # time per output token after the first
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive tokens
    detail: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


class Engine:
    """One inference engine under test. Subclasses set name and kind and implement the methods."""

    name = "engine"
    kind = "in-process"  # or "http"

    def __init__(self, settings: EngineSettings):
        self.settings = settings

    def preflight(self) -> None:
        """Check everything the runs need (raise PreflightError saying what is missing); loads nothing heavy."""

    def load(self) -> dict:
        """Load the model; returns {'load_seconds': ...} and anything else worth recording."""
        return {}

    def unsupported(self, test: Workload) -> str | None:
        """Why this engine cannot run the test, or None when it can."""
        return None

    def run(self, test: Workload, prompts: list[Prompt]) -> Sample:
        """One repetition of the test, with one prompt per sequence."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Version, backend, threads and settings, recorded with every result."""
        return {}

    def resources(self) -> dict:
        """Peak resident memory (when it is this process's) and compile times, after the runs."""
        return {"peak_rss_bytes": peak_rss_bytes() if self.settings.isolated else None}

    def close(self) -> None:
        """Release the model."""


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (Linux VmHWM, else getrusage)."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError):
        return None


def resident_bytes() -> int | None:
    """This process's resident set size now (Linux only)."""
    return proc_bytes("/proc/self/status", "VmRSS")


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pin_threads(threads: int) -> int:
    """Restrict this process to `threads` cores when fewer than it may use (XLA sizes its pool from them)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
    if threads < len(cores):
        os.sched_setaffinity(0, cores[:threads])
    return len(os.sched_getaffinity(0))
