"""Chat templates rendered in a child process with bounded output, time and memory.

A GGUF's chat template is code from an untrusted file. Jinja's ImmutableSandboxedEnvironment
keeps it away from Python's internals, but not from the machine's resources: one expression
such as `'a' * 10**10`, `'x' | center(10**10)` or two nested `range(100000)` loops can take
gigabytes or minutes. So templates render in a separate, small Python process (Jinja only, no
JAX) that:

- runs under an address-space limit (RLIMIT_AS: its size at start plus MEMORY_LIMIT_BYTES), so
  an allocation past it raises MemoryError there and leaves the server's memory alone;
- is killed and replaced when a render takes longer than TIME_LIMIT_SECONDS, so an abandoned
  render never keeps burning a core (a thread cannot be stopped; a process can), and runs at the
  lowest CPU priority meanwhile;
- stops at OUTPUT_LIMIT_CHARS of rendered text.

Inside the sandbox, the common amplifiers are refused before they allocate, with a message that
names the limit: `range` beyond RANGE_LIMIT items, `*` and `+` building a string or list over the
output limit, `**` with a result over POWER_LIMIT_BITS, and `tojson(indent=...)` beyond
INDENT_LIMIT. Every refusal reaches the caller as a RequestError (gRPC INVALID_ARGUMENT).

One child (rz.template_child, run by its path so that it imports Jinja but not rz and JAX)
serves every template of the process, one render at a time (renders of real chat templates
take well under a millisecond); it starts on the first render. At most WAITING_LIMIT renders
wait their turn; more at once is TemplateBusyError (gRPC RESOURCE_EXHAUSTED), so renders that
run into the time limit one after another cannot hold every request thread of a server.
"""

import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from rz import template_child
from rz.errors import RequestError, TemplateBusyError
from rz.template_child import INDENT_LIMIT, MEMORY_LIMIT_BYTES, OUTPUT_LIMIT_CHARS, POWER_LIMIT_BITS, RANGE_LIMIT

TIME_LIMIT_SECONDS = 1.0
WAITING_LIMIT = 8
_STARTUP_SECONDS = 60.0
# The child's file run as __main__ with neither the current directory nor the file's own on the
# module path (a module there could shadow one of the standard library's).
_RUN_CHILD = "import runpy, sys; sys.path.pop(0); runpy.run_path(sys.argv[1], run_name='__main__')"

__all__ = [
    "TemplateRenderer", "render_template", "TIME_LIMIT_SECONDS", "WAITING_LIMIT", "OUTPUT_LIMIT_CHARS", "MEMORY_LIMIT_BYTES",
    "RANGE_LIMIT", "POWER_LIMIT_BITS", "INDENT_LIMIT",
]


class TemplateRenderer:
    """Renders templates in the sandbox child; thread-safe, one render at a time, at most
    waiting_limit more waiting."""

    def __init__(self, time_limit: float = TIME_LIMIT_SECONDS, waiting_limit: int = WAITING_LIMIT):
        self.time_limit = time_limit
        self.waiting_limit = waiting_limit
        self._admitted = threading.BoundedSemaphore(waiting_limit + 1)  # the render running and those waiting
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._buffer = b""

    def render(self, template: str, variables: dict, time_limit: float | None = None) -> str:
        """The rendered text; RequestError naming the limit or the failure otherwise. time_limit
        (seconds) replaces the renderer's for this render."""
        try:
            job = (json.dumps({"template": template, "variables": variables}) + "\n").encode()
        except (TypeError, ValueError) as error:
            raise RequestError(f"the chat's messages must hold only JSON values (strings, numbers, lists, objects): {error}") from None
        if not self._admitted.acquire(blocking=False):
            raise TemplateBusyError(
                f"{self.waiting_limit} chat templates are already waiting to render (each may take up to "
                f"{self.time_limit:g} s); retry later"
            )
        try:
            with self._lock:
                answer = self._exchange(job, self.time_limit if time_limit is None else time_limit)
        finally:
            self._admitted.release()
        if "error" in answer:
            raise RequestError(answer["error"])
        return answer["text"]

    def close(self) -> None:
        """Stop the child (a later render starts a new one)."""
        with self._lock:
            self._stop_child()

    def _exchange(self, job: bytes, time_limit: float) -> dict:
        child = self._child if self._child is not None and self._child.poll() is None else self._start_child()
        try:
            child.stdin.write(job)
            child.stdin.flush()
            line = self._read_line(child, time.monotonic() + time_limit)
        except BrokenPipeError:
            line = None
        if line is None:
            timed_out = child.poll() is None
            self._stop_child()
            if timed_out:
                raise RequestError(f"the chat template took over {time_limit:g} s to render (time limit)")
            raise RequestError("the chat template's renderer died (memory limit or crash)")
        return json.loads(line)

    def _read_line(self, child: subprocess.Popen, deadline: float) -> bytes | None:
        """The child's next line, or None if it is not complete by the deadline or the child ended."""
        descriptor = child.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([descriptor], [], [], remaining)[0]:
                return None
            chunk = os.read(descriptor, 1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _start_child(self) -> subprocess.Popen:
        self._stop_child()
        self._child = subprocess.Popen(
            [sys.executable, "-c", _RUN_CHILD, str(Path(template_child.__file__).resolve())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        # The time limit is the render's: starting Python (a second or more on a busy machine)
        # is waited for apart.
        if self._read_line(self._child, time.monotonic() + _STARTUP_SECONDS) != template_child.READY.encode():
            self._stop_child()
            raise RequestError("the chat template sandbox did not start")
        return self._child

    def _stop_child(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child.stdin.close()
            self._child.stdout.close()
            self._child = None
        self._buffer = b""


_RENDERER = TemplateRenderer()


def render_template(template: str, variables: dict, time_limit: float | None = None) -> str:
    """Render a template with JSON-able variables in the process's sandbox child (time_limit: as TemplateRenderer.render's)."""
    return _RENDERER.render(template, variables, time_limit)
