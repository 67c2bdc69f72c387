"""The timing loop: warm-up, then engines interleaved round by round until each one's CV settles.

Per test, every engine first runs `warmup` repetitions that are recorded but never summarised
(JIT compilation and cold caches land there). Then rounds follow; in each round every
engine still going runs one repetition, the order alternating (A B, B A, ...) so that a drift in
machine speed or a cache warmed by the previous engine falls on both sides alike. An engine
stops when its CV is under the threshold, or at the repetition or time budget; the result says
which. Outliers by MAD are listed, never dropped.
"""

import sys
import time
from dataclasses import dataclass, field

from rz.bench import stats
from rz.bench.bandwidth import achieved_bandwidth
from rz.bench.engines import Engine, Sample
from rz.bench.errors import BenchError
from rz.bench.workloads import PromptMaker, Workload


class Progress:
    """One status line on stderr: engine, test, repetition, current CV (a line per update when not a TTY)."""

    def __init__(self, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self._width = 0

    def update(self, text: str) -> None:
        if not self.enabled:
            return
        if self.live:
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that stays (the live line is cleared first)."""
        if not self.enabled:
            return
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()


@dataclass
class _Track:
    """One engine's repetitions of one test, while they run."""

    engine: Engine
    warmup: list[Sample] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    stop_reason: str | None = None
    status: str = "ok"
    reason: str | None = None

    @property
    def running(self) -> bool:
        return self.status == "ok" and self.stop_reason is None


class Runner:
    """Runs every test on every engine and returns one result entry per (test, engine)."""

    def __init__(self, engines: list[Engine], prompts: PromptMaker, rule: stats.StoppingRule, warmup: int = 1,
                 weight_bytes_per_token: int | None = None, machine_gb_per_s: float | None = None,
                 progress: Progress | None = None):
        self.engines = engines
        self.prompts = prompts
        self.rule = rule
        self.warmup = warmup
        self.weight_bytes_per_token = weight_bytes_per_token
        self.machine_gb_per_s = machine_gb_per_s
        self.progress = progress or Progress(enabled=False)

    def run(self, tests: list[Workload]) -> list[dict]:
        results = []
        for test in tests:
            results.extend(self.run_test(test))
        return results

    def run_test(self, test: Workload) -> list[dict]:
        tracks = [_Track(engine) for engine in self.engines]
        for track in tracks:
            reason = track.engine.unsupported(test)
            if reason:
                track.status, track.reason = "skipped", reason
                self.progress.message(f"[{track.engine.name}] {test.name}: skipped ({reason})")
        for track in tracks:
            for repetition in range(self.warmup):
                if track.status == "ok":
                    self._repeat(track, test, -1 - repetition, warmup=True)
        round_index = 0
        while any(track.running for track in tracks):
            order = tracks if round_index % 2 == 0 else tracks[::-1]
            for track in order:
                if track.running:
                    self._repeat(track, test, len(track.samples), warmup=False)
                    if track.status == "ok":
                        values = [s.tokens_per_second for s in track.samples]
                        track.stop_reason = self.rule.reason_to_stop(values, track.seconds)
            round_index += 1
        return [self._result(test, track) for track in tracks]

    def _repeat(self, track: _Track, test: Workload, repetition: int, warmup: bool) -> None:
        """One repetition (warm-up ones get negative indices and prompts of their own)."""
        engine = track.engine
        label = "warm-up" if warmup else f"rep {repetition + 1}/{self.rule.max_reps}"
        cv = stats.coefficient_of_variation([s.tokens_per_second for s in track.samples])
        cv_text = f"  cv {cv:.1%}" if cv != float("inf") else ""
        self.progress.update(f"[{engine.name}] {test.name}  {label}{cv_text}")
        prompts = [self.prompts.make(test.prompt_length, test, repetition, sequence) for sequence in range(test.batch)]
        started = time.perf_counter()
        try:
            sample = engine.run(test, prompts)
        except Exception as error:  # noqa: BLE001 - one engine failing must not end the others' runs
            message = str(error) if isinstance(error, BenchError) else f"{type(error).__name__}: {error}"
            track.status, track.reason = "failed", message
            self.progress.message(f"[{engine.name}] {test.name}: failed: {message}")
            return
        if not warmup:
            track.seconds += time.perf_counter() - started
        if sample.seconds <= 0:
            track.status, track.reason = "failed", f"a repetition measured {sample.seconds:.3g} s, not a positive time"
            return
        (track.warmup if warmup else track.samples).append(sample)

    def _result(self, test: Workload, track: _Track) -> dict:
        values = [s.tokens_per_second for s in track.samples]
        status, reason = track.status, track.reason
        if status == "ok" and not values:
            status, reason = "failed", "no repetition completed"
        summary = stats.summarize(values) if status == "ok" else None
        bandwidth = None
        if summary and test.kind == "tg" and self.weight_bytes_per_token:
            bandwidth = achieved_bandwidth(self.weight_bytes_per_token, summary["mean"], test.batch, self.machine_gb_per_s)
        return {
            "test": test.as_dict(),
            "engine": track.engine.name,
            "status": status,
            "reason": reason,
            "warmup": [sample_dict(s) for s in track.warmup],
            "samples": [sample_dict(s) for s in track.samples],
            "tokens_per_second": summary,
            "stop_reason": track.stop_reason if summary else None,
            "outliers": stats.mad_outliers(values),
            "latency": {
                "ttft_s": stats.latency_summary([s.ttft_s for s in track.samples if s.ttft_s is not None]),
                "tpot_s": stats.latency_summary([s.tpot_s for s in track.samples if s.tpot_s is not None]),
                "itl_s": stats.latency_summary([gap for s in track.samples for gap in s.itl_s]),
            },
            "bandwidth": bandwidth,
        }


def sample_dict(sample: Sample) -> dict:
    return {
        "seconds": sample.seconds,
        "tokens": sample.tokens,
        "tokens_per_second": sample.tokens_per_second,
        "ttft_s": sample.ttft_s,
        "tpot_s": sample.tpot_s,
        "itl_s": list(sample.itl_s),
        "detail": dict(sample.detail),
    }


def compute_ratios(results: list[dict], subject: str) -> list[dict]:
    """subject / peer throughput for every test both ran, with its spread."""
    by_test: dict[str, dict[str, dict]] = {}
    for entry in results:
        if entry["status"] == "ok":
            by_test.setdefault(entry["test"]["name"], {})[entry["engine"]] = entry["tokens_per_second"]
    ratios = []
    for test, engines in by_test.items():
        if subject not in engines:
            continue
        for peer, summary in engines.items():
            if peer != subject:
                ratios.append({"test": test, "engine": subject, "peer": peer} | stats.ratio(engines[subject], summary))
    return ratios
