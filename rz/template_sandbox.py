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

One child serves every template of the process, one render at a time (renders of real chat
templates take well under a millisecond); it starts on the first render.
"""

import json
import operator
import os
import resource
import select
import subprocess
import sys
import threading
import time
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from rz.errors import RequestError

OUTPUT_LIMIT_CHARS = 4 << 20  # four times `rz serve`'s default --max-request-bytes
TIME_LIMIT_SECONDS = 1.0
MEMORY_LIMIT_BYTES = 192 << 20
RANGE_LIMIT = 100_000  # Jinja's own sandbox MAX_RANGE
POWER_LIMIT_BITS = 4096
INDENT_LIMIT = 32
_STARTUP_SECONDS = 60.0
_READY = "ready"


class TemplateLimitError(Exception):
    """A template went past one of the sandbox's limits (raised inside the child)."""


# ----- the child: a Jinja environment with limits, reading requests from stdin -----


def _checked_size(size: int, what: str) -> None:
    if size > OUTPUT_LIMIT_CHARS:
        raise TemplateLimitError(f"{what} would hold {size} items, over the limit of {OUTPUT_LIMIT_CHARS}")


_SEQUENCE_NAMES = {str: "string", list: "list", tuple: "tuple"}


def _limited_binop(op: str, left, right):
    sequences = tuple(_SEQUENCE_NAMES)
    if op == "*":
        for sequence, count in ((left, right), (right, left)):
            if isinstance(sequence, sequences) and isinstance(count, int):
                _checked_size(len(sequence) * max(count, 0), f"{_SEQUENCE_NAMES[type(sequence)]} multiplication")
    elif op == "+" and isinstance(left, sequences) and isinstance(right, sequences):
        _checked_size(len(left) + len(right), f"{_SEQUENCE_NAMES[type(left)]} concatenation")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
        bits = abs(left).bit_length() * right
        if bits > POWER_LIMIT_BITS:
            raise TemplateLimitError(f"a power of about {bits} bits is over the limit of {POWER_LIMIT_BITS} bits")
    return _BINOPS[op](left, right)


_BINOPS = {"*": operator.mul, "+": operator.add, "**": operator.pow}


def _limited_range(*args: int) -> range:
    items = range(*args)
    if len(items) > RANGE_LIMIT:
        raise TemplateLimitError(f"range of {len(items)} items is over the limit of {RANGE_LIMIT}")
    return items


def _raise_exception(message: str):
    import jinja2

    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON
    # that Hugging Face and llama.cpp produce.
    if isinstance(indent, int) and not 0 <= indent <= INDENT_LIMIT:
        raise TemplateLimitError(f"tojson indent {indent} is outside 0..{INDENT_LIMIT}")
    if isinstance(indent, str) and len(indent) > INDENT_LIMIT:
        raise TemplateLimitError(f"tojson indent of {len(indent)} characters is over the limit of {INDENT_LIMIT}")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_environment():
    """Hugging Face's and llama.cpp's template environment (trim_blocks, lstrip_blocks, loop
    controls, raise_exception, strftime_now, plain tojson), sandboxed and with limits."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class LimitedEnvironment(ImmutableSandboxedEnvironment):
        # Intercepted operators are also never folded at compile time.
        intercepted_binops = frozenset(_BINOPS)

        def call_binop(self, context, op, left, right):
            return _limited_binop(op, left, right)

    environment = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["range"] = _limited_range
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


@lru_cache(maxsize=32)
def _compile(environment, source: str):
    return environment.from_string(source)


def _describe(error: Exception) -> str:
    import jinja2

    line = f" (template line {error.lineno})" if isinstance(error, jinja2.TemplateSyntaxError) else ""
    return f"{type(error).__name__}: {error}{line}"


def _render_in_child(environment, job: dict) -> dict:
    """One render's answer: {"text": ...} or {"error": ...}."""
    import jinja2

    try:
        template = _compile(environment, job["template"])
    except jinja2.TemplateSyntaxError as error:
        return {"error": f"the chat template does not parse: {_describe(error)}"}
    except MemoryError:
        return {"error": f"the chat template needs over {MEMORY_LIMIT_BYTES >> 20} MiB to compile (memory limit)"}
    pieces, size = [], 0
    try:
        for piece in template.generate(**job["variables"]):
            size += len(piece)
            if size > OUTPUT_LIMIT_CHARS:
                raise TemplateLimitError(f"the rendered prompt is over the output limit of {OUTPUT_LIMIT_CHARS} characters")
            pieces.append(piece)
        return {"text": "".join(pieces)}
    except TemplateLimitError as error:
        return {"error": f"the chat template went past a limit: {error}"}
    except MemoryError:
        return {"error": f"the chat template needed over {MEMORY_LIMIT_BYTES >> 20} MiB (memory limit)"}
    except Exception as error:  # noqa: BLE001 - whatever fails inside untrusted code is the template's
        return {"error": f"the chat template failed: {_describe(error)}"}


def _child_main() -> None:
    # A render that spins until it is killed must not take CPU from the engine's threads, nor
    # outlive a server that exits meanwhile.
    os.nice(19)
    _die_with_parent()
    environment = _make_environment()
    size = _address_space_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_LIMIT_BYTES, size + MEMORY_LIMIT_BYTES))
    sys.stdout.write(_READY + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        answer = _render_in_child(environment, json.loads(line))
        try:
            encoded = json.dumps(answer)
        except MemoryError:
            encoded = json.dumps({"error": f"the chat template needed over {MEMORY_LIMIT_BYTES >> 20} MiB (memory limit)"})
        sys.stdout.write(encoded + "\n")
        sys.stdout.flush()


def _die_with_parent() -> None:
    """End this process within a second of its parent's end (then it is re-parented). Linux's
    PR_SET_PDEATHSIG would follow the thread that started the child, not the process."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


# ----- the parent: one child, restarted when it overruns or dies -----


class TemplateRenderer:
    """Renders templates in the sandbox child; thread-safe, one render at a time."""

    def __init__(self, time_limit: float = TIME_LIMIT_SECONDS):
        self.time_limit = time_limit
        self._lock = threading.Lock()
        self._child: subprocess.Popen | None = None
        self._buffer = b""

    def render(self, template: str, variables: dict) -> str:
        """The rendered text; RequestError naming the limit or the failure otherwise."""
        try:
            job = (json.dumps({"template": template, "variables": variables}) + "\n").encode()
        except (TypeError, ValueError) as error:
            raise RequestError(f"the chat's messages must hold only JSON values (strings, numbers, lists, objects): {error}") from None
        with self._lock:
            answer = self._exchange(job)
        if "error" in answer:
            raise RequestError(answer["error"])
        return answer["text"]

    def close(self) -> None:
        """Stop the child (a later render starts a new one)."""
        with self._lock:
            self._stop_child()

    def _exchange(self, job: bytes) -> dict:
        child = self._child if self._child is not None and self._child.poll() is None else self._start_child()
        try:
            child.stdin.write(job)
            child.stdin.flush()
            line = self._read_line(child, time.monotonic() + self.time_limit)
        except BrokenPipeError:
            line = None
        if line is None:
            timed_out = child.poll() is None
            self._stop_child()
            if timed_out:
                raise RequestError(f"the chat template took over {self.time_limit:g} s to render (time limit)")
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
        package_root = str(Path(__file__).resolve().parents[1])
        environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        self._child = subprocess.Popen(
            [sys.executable, "-c", "from rz.template_sandbox import _child_main; _child_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment,
        )
        # The time limit is the render's: starting Python (a second or more on a busy machine)
        # is waited for apart.
        if self._read_line(self._child, time.monotonic() + _STARTUP_SECONDS) != _READY.encode():
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


def render_template(template: str, variables: dict) -> str:
    """Render a template with JSON-able variables in the process's sandbox child."""
    return _RENDERER.render(template, variables)
