"""Scripted engines for the rz.bench tests: repetitions of known length, no model needed."""

from rz.bench.engines.base import Engine, Sample
from rz.bench.errors import BenchError


class ScriptedEngine(Engine):
    """An engine whose repetitions take the seconds it is given, in order (cycling), and log their calls."""

    name = "scripted"
    kind = "in-process"
    script: tuple[float, ...] = (1.0,)
    calls: list = []
    fail_on: str | None = None  # a test name whose repetitions raise
    unsupported_tests: tuple[str, ...] = ()
    threads = 2

    def __init__(self, settings):
        super().__init__(settings)
        self.index = 0

    def load(self):
        return {"load_seconds": 0.5}

    def describe(self):
        return {"version": f"{self.name} 1.0", "backend": "fake", "threads": self.threads}

    def unsupported(self, test):
        return "not scripted" if test.name in self.unsupported_tests else None

    def run(self, test, prompts):
        self.calls.append((self.name, test.name, prompts[0].ids[:3]))
        if test.name == self.fail_on:
            raise BenchError("scripted failure")
        seconds = self.script[self.index % len(self.script)]
        self.index += 1
        return Sample(seconds=seconds, tokens=test.tokens_counted, ttft_s=seconds / 10, tpot_s=seconds / 100,
                      itl_s=[seconds / 100] * 3)

    def resources(self):
        return {"peak_rss_bytes": 1 << 20, "compile_seconds": {"decode": 0.25}}


def scripted(name: str, script, **attributes) -> type:
    """A ScriptedEngine subclass called name, with its own call log."""
    return type(f"Scripted_{name}", (ScriptedEngine,), {"name": name, "script": tuple(script), "calls": [], **attributes})
