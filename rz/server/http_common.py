"""What the HTTP fronts (OpenAI, Ollama) share: reading JSON bodies, their errors, and the bridge to
the engine loop, which submits validated requests and streams their events to asyncio code.

The loop delivers events on a thread-safe queue per ticket; each read waits in a worker thread
of a limiter of its own, so streams waiting for tokens never take the threads that run the
synchronous endpoints. A stream that is left (the client went away, the task was cancelled)
cancels its tickets, so their slots go to other requests at the next step.
"""

import contextlib
import dataclasses
import json
import math
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio
import grpc

from rz.errors import RzError
from rz.generation import Generation, GenerationRequest, StepEvent
from rz.kv_blocks import KVCacheCapacityError
from rz.request import FinishReason, RequestOptions
from rz.server.metrics import Metrics
from rz.server.scheduler import CLIENT_CANCELLED, EngineLoop, Ticket
from rz.server.service import NotReadyError, status_of
from rz.tokenizer import long_texts

# Threads blocked reading tickets' events: one per ticket in flight, however many the loop admits.
_READER_THREADS = 1024
# The status of an answer whose client left (nginx's "client closed request"): nobody reads it.
CLIENT_CLOSED = 499
# The HTTP status of each failure class, from the gRPC code rz.server.service gives it.
HTTP_STATUS = {
    grpc.StatusCode.CANCELLED: CLIENT_CLOSED,  # the client left while its prompt was tokenized
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # the model's chat template is broken: completions still work
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.INTERNAL: 500,
}


class HttpError(RzError):
    """A request refused with an HTTP status; param names the offending field, when one is to blame."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


# The gRPC code name an HTTP status is counted under in rz_requests_total, as gRPC counts the same failure.
# Several codes share 400: it is counted as the first of them, INVALID_ARGUMENT.
_STATUS_NAMES = {status: code.name for code, status in reversed(HTTP_STATUS.items())} | {413: "INVALID_ARGUMENT", 404: "NOT_FOUND"}


def count_refusal(metrics: Metrics, method: str, status: int, error: Exception) -> None:
    """Count a request that failed before or without a ticket (one that had tickets was counted by Backend.events)."""
    if not getattr(error, "counted_in_metrics", False):
        metrics.requests.labels(method, _STATUS_NAMES.get(status, "UNKNOWN")).inc()


def http_status(error: Exception, call: str) -> int:
    """The HTTP status of a failure (server failures are logged by status_of)."""
    if isinstance(error, HttpError):
        return error.status
    if isinstance(error, KVCacheCapacityError):
        return 400  # as a context overflow: retrying cannot help, unlike gRPC's RESOURCE_EXHAUSTED elsewhere
    return HTTP_STATUS[status_of(error, call)]


async def read_json(request, limit: int) -> dict:
    """A request's body as a JSON object: HttpError 413 past `limit` bytes, 400 if it is not a JSON object."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, f"the request is {declared} bytes, over the server's limit of {limit} bytes (--max-request-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HttpError(413, f"the request is over the server's limit of {limit} bytes (--max-request-bytes)")
    return parse_json(bytes(body))


def parse_json(body: bytes) -> dict:
    """A request body as a JSON object, or HttpError 400 saying what is wrong with it."""
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise HttpError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise HttpError(400, f"the request body must be a JSON object, got {type(value).__name__}")
    return value


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array", dict: "an object"}


def field(body: dict, name: str, kind: type | tuple, default: Any = None) -> Any:
    """body[name] checked to be of `kind` (float accepts integers; bool is never a number), or default if absent/null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = kinds + (int,)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        expected = " or ".join(_TYPE_NAMES[k] for k in kinds if k is not int or float not in kinds)
        raise HttpError(400, f"'{name}' must be {expected}, got {json.dumps(value)[:100]}", param=name)
    if is_number and not math.isfinite(value):
        raise HttpError(400, f"'{name}' must be finite", param=name)
    return value


async def run_sync(function, *args):
    """function(*args) in a worker thread, off the event loop."""
    return await anyio.to_thread.run_sync(function, *args)


async def run_while_connected(request, function, *args):
    """function(*args) in a worker thread, for tokenizing and templating a request's text (seconds
    for long texts): a long text of a client that disconnects meanwhile is dropped, and the call
    raises CallerGoneError (HTTP 499), as gRPC drops one whose call ended (rz.tokenizer.long_texts)."""
    gone = threading.Event()

    def work():
        with long_texts.dropped_when(gone):
            return function(*args)

    async def watch():
        while not await request.is_disconnected():
            await anyio.sleep(_DISCONNECT_POLL_S)
        gone.set()

    async with _task_group() as group:
        group.start_soon(watch)
        try:
            return await run_sync(work)
        finally:
            group.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def _task_group():
    """An anyio task group that raises a lone failure as itself, not inside an ExceptionGroup, so the
    routes' handlers see the RzError and answer with its status."""
    try:
        async with anyio.create_task_group() as group:
            yield group
    except BaseExceptionGroup as failures:
        if len(failures.exceptions) == 1:
            raise failures.exceptions[0] from None
        raise


def stop_strings(value, name: str = "stop") -> tuple[str, ...]:
    """A stop field (a string or a list of strings) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise HttpError(400, f"'{name}' must be a string or an array of strings", param=name)


@dataclass(frozen=True)
class Attached:
    """The served model, once loaded: its LLM (host-side text work), loop, and name."""

    llm: Any
    loop: EngineLoop
    model_name: str


class Backend:
    """The engine loop as the HTTP fronts see it: ready or not, submit, and read events."""

    def __init__(self, metrics: Metrics, max_request_bytes: int):
        self.metrics = metrics
        self.max_request_bytes = max_request_bytes
        self.attached: Attached | None = None
        self._readers = anyio.CapacityLimiter(_READER_THREADS)

    async def json(self, request) -> dict:
        """The request's JSON object body, within --max-request-bytes."""
        return await read_json(request, self.max_request_bytes)

    def ready(self) -> Attached:
        if self.attached is None:
            raise NotReadyError("the server is loading and compiling the model; retry when GET /health answers 200")
        return self.attached

    def submit(self, prompt_ids: list[int], options: dict, n: int = 1) -> list[Ticket]:
        """Validate a request from flat options and queue it n times (seed + i for copy i).

        Called through run_sync: validating compiles a structured-output constraint, and the
        first one builds the vocabulary llguidance compiles against (seconds for Gemma's 262k tokens).
        """
        attached = self.ready()
        options = RequestOptions.from_flat(**options)
        requests = []
        for i in range(n):
            sampling = options.sampling
            if i and sampling.seed is not None:  # copies with one seed would be the same text
                sampling = dataclasses.replace(sampling, seed=(sampling.seed + i) % 2**32)
            request = GenerationRequest(tuple(prompt_ids), dataclasses.replace(options, sampling=sampling))
            attached.loop.engine.validate(request)
            requests.append(request)
        tickets = []
        try:
            for request in requests:
                tickets.append(attached.loop.submit(request))
        except RzError:
            for ticket in tickets:
                attached.loop.cancel(ticket, CLIENT_CANCELLED)
            raise
        return tickets

    async def events(self, tickets: list[Ticket], method: str) -> AsyncIterator[tuple[int, StepEvent]]:
        """(ticket index, event) for every event of the tickets, until each has finished.

        It waits on the first unfinished ticket and takes what the others have ready meanwhile:
        the tickets share the loop's steps, so the choices of one request stream side by side.
        Raises the RzError that ended a ticket; leaving early cancels the tickets still running.
        Each ticket is counted in the metrics under `method`.
        """
        outcome = {}

        def take(index: int, item) -> StepEvent | None:
            """The event to pass on; None when the caller is gone (a Cancelled item)."""
            if isinstance(item, Exception):
                outcome[index] = status_of(item, method).name
                item.counted_in_metrics = True
                raise item
            if isinstance(item, StepEvent) and item.finish_reason is not None:
                outcome[index] = "CANCELLED" if item.finish_reason == FinishReason.CANCELLED else "OK"
                pending.remove(index)
            return item if isinstance(item, StepEvent) else None

        pending = list(range(len(tickets)))
        try:
            while pending:
                first = pending[0]
                item = await anyio.to_thread.run_sync(tickets[first].events.get, abandon_on_cancel=True, limiter=self._readers)
                ready = [(first, item)]
                for index in pending[1:]:
                    while not tickets[index].events.empty():
                        ready.append((index, tickets[index].events.get_nowait()))
                for index, item in ready:
                    event = take(index, item)
                    if event is None:  # a cancel from elsewhere: nobody reads further
                        return
                    yield index, event
        finally:
            loop = self.attached.loop
            for index, ticket in enumerate(tickets):
                if not ticket.done:
                    loop.cancel(ticket, CLIENT_CANCELLED)
                self.metrics.observe_request(method, outcome.get(index, "CANCELLED"), ticket.sequence)


# How often a request checks that its client is still there while nothing is written to it.
_DISCONNECT_POLL_S = 0.25


async def unless_disconnected(request, events: AsyncIterator, collect: Callable[[AsyncIterator], Awaitable[Any]]) -> Any:
    """await collect(events) (a whole answer), or None if the client disconnects first: then the
    events are closed, which cancels their tickets, so the slots go to other requests.

    A streamed answer learns of a disconnect when a write fails; a whole one writes only at the
    end, so it watches the connection meanwhile.
    """
    result = None
    async with contextlib.aclosing(events):
        async with _task_group() as group:

            async def run():
                nonlocal result
                result = await collect(events)
                group.cancel_scope.cancel()

            async def watch():
                while not await request.is_disconnected():
                    await anyio.sleep(_DISCONNECT_POLL_S)
                group.cancel_scope.cancel()

            group.start_soon(run)
            group.start_soon(watch)
    return result


def usage(sequences: list[Generation]) -> dict:
    """Token counts of one request's sequences (the prompt is counted once), with OpenAI's
    prompt_tokens_details.cached_tokens: the prompt tokens the KV cache served (prefix reuse)
    before this request, counted once too: its first choice's. The other choices copy the
    prompt from the first, which computed it."""
    prompt = len(sequences[0].request.prompt_ids)
    completion = sum(len(sequence.output_ids) for sequence in sequences)
    cached = min(sequence.n_cached for sequence in sequences)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
