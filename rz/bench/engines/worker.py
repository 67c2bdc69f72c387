"""An in-process engine run in a worker process of its own, driven over a pipe.

Each in-process engine gets its own process so that its peak resident memory is its own, its
threads can be pinned without touching the other engine's, and one engine's crash is reported
as a failure instead of taking the run down.
"""

import multiprocessing
import traceback

from rz.bench.engines.base import Engine, resident_bytes
from rz.bench.errors import BenchError, EngineUnsupported, PreflightError

_ERRORS = {"PreflightError": PreflightError, "EngineUnsupported": EngineUnsupported}


def _serve(connection, engine_class, settings) -> None:
    """The worker's loop: build the engine, then answer (method, args) calls until 'close'."""
    engine = engine_class(settings)
    before_load = None
    while True:
        try:
            method, args = connection.recv()
        except EOFError:
            return
        try:
            if method == "load":
                # What the process holds before the model (Python, NumPy, JAX): peak less this is the engine's own.
                before_load = resident_bytes()
            answer = getattr(engine, method)(*args)
            if method == "resources":
                answer = answer | {"rss_before_load_bytes": before_load}
            reply = ("ok", answer)
        except BaseException as error:  # noqa: BLE001 - every failure goes back as one message
            message = str(error) or type(error).__name__
            if not isinstance(error, BenchError):
                message = f"{type(error).__name__}: {message}"
            reply = ("error", type(error).__name__, message, traceback.format_exc())
        connection.send(reply)
        if method == "close":
            return


class WorkerEngine(Engine):
    """A proxy with the Engine interface; every call runs in the worker process."""

    def __init__(self, engine_class, settings):
        super().__init__(settings)
        self.name = engine_class.name
        self.kind = engine_class.kind
        context = multiprocessing.get_context("spawn")
        self._connection, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, engine_class, settings), daemon=True)
        self._process.start()
        child.close()

    def _call(self, method: str, *args):
        try:
            self._connection.send((method, args))
            reply = self._connection.recv()
        except (EOFError, OSError, BrokenPipeError):
            code = self._process.exitcode
            raise BenchError(f"the {self.name} worker process died (exit code {code}) during {method}") from None
        if reply[0] == "ok":
            return reply[1]
        _, kind, message, _trace = reply
        raise _ERRORS.get(kind, BenchError)(message)

    def preflight(self):
        return self._call("preflight")

    def load(self):
        return self._call("load")

    def unsupported(self, test):
        return self._call("unsupported", test)

    def run(self, test, prompts):
        return self._call("run", test, prompts)

    def describe(self):
        return self._call("describe")

    def resources(self):
        return self._call("resources")

    def close(self):
        if self._process.is_alive():
            try:
                self._call("close")
            except BenchError:
                pass
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        self._connection.close()
