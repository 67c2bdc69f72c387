"""The chat-template sandbox's child process: a limited Jinja environment rendering requests
read from stdin (rz.template_sandbox starts it and explains the limits).

The parent runs this file by its path, outside the rz package, whose import pulls in JAX: the
child needs Jinja and the standard library only, so it starts in a fraction of a second and
stays small. So it imports nothing from rz.
"""

import json
import operator
import os
import resource
import sys
import threading
import time
from datetime import datetime
from functools import lru_cache

OUTPUT_LIMIT_CHARS = 4 << 20  # four times `rz serve`'s default --max-request-bytes
MEMORY_LIMIT_BYTES = 192 << 20
RANGE_LIMIT = 100_000  # Jinja's own sandbox MAX_RANGE
POWER_LIMIT_BITS = 4096
INDENT_LIMIT = 32
READY = "ready"


class TemplateLimitError(Exception):
    """A template went past one of the sandbox's limits (raised inside the child)."""


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


def child_main() -> None:
    # A render that spins until it is killed must not take CPU from the engine's threads, nor
    # outlive a server that exits meanwhile.
    os.nice(19)
    _die_with_parent()
    environment = _make_environment()
    size = _address_space_bytes()
    resource.setrlimit(resource.RLIMIT_AS, (size + MEMORY_LIMIT_BYTES, size + MEMORY_LIMIT_BYTES))
    sys.stdout.write(READY + "\n")
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


if __name__ == "__main__":
    child_main()
