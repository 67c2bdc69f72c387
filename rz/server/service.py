"""The gRPC adapter: protobuf requests to the engine's types, engine events to streamed messages,
rz's errors to status codes. It queues and streams; the engine loop does the work."""

import logging
import threading

import grpc

from rz.api.messages import chat_tools, finish_reason_value, request_options, tool_calls_message
from rz.api.v1 import inference_pb2 as pb
from rz.api.v1 import inference_pb2_grpc as pb_grpc
from rz.errors import (
    CallerGoneError,
    ChatTemplateError,
    RequestError,
    RzError,
    TemplateBusyError,
    TokenizerBusyError,
    TokenizerError,
)
from rz.generation import GenerationRequest, StepEvent
from rz.kv_blocks import KVCacheCapacityError
from rz.request import FinishReason, RequestOptions, check_token_ids
from rz.server.metrics import Metrics
from rz.tokenizer import long_texts
from rz.tools import parse_tool_calls, with_call_constraint
from rz.server.scheduler import (
    CLIENT_CANCELLED,
    DEADLINE_EXCEEDED,
    Cancelled,
    EngineFailure,
    EngineLoop,
    OverCapacityError,
    ShuttingDownError,
    Ticket,
)

log = logging.getLogger("rz.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name

_DEADLINE_SLACK = 0.05
_CANCEL_STATUS = {CLIENT_CANCELLED: grpc.StatusCode.CANCELLED, DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED}


class NotReadyError(RzError):
    """The server is still loading or compiling the model."""


class InferenceService(pb_grpc.InferenceServiceServicer):
    """rz.v1.InferenceService over an LLM (host-side text work) and an EngineLoop (generation)."""

    def __init__(self, metrics: Metrics, max_request_bytes: int):
        self._metrics = metrics
        self._max_request_bytes = max_request_bytes
        self._llm = None
        self._loop: EngineLoop | None = None
        self._info: pb.ModelInfoResponse | None = None

    def attach(self, llm, loop: EngineLoop, info: pb.ModelInfoResponse) -> None:
        """Start answering: until then every call gets UNAVAILABLE."""
        self._llm, self._info, self._loop = llm, info, loop

    # ----- the RPCs -----

    def Generate(self, request: pb.GenerateRequest, context):
        return self._generate("Generate", request, context, self._prompt_ids)

    def Chat(self, request: pb.ChatRequest, context):
        return self._generate("Chat", request, context, self._chat_prompt_ids)

    def Tokenize(self, request: pb.TokenizeRequest, context):
        def tokenize():
            add_bos = request.add_bos if request.HasField("add_bos") else None
            with _dropped_when_gone(context):
                token_ids = self._llm.tokenize(request.text, add_bos=add_bos, special=request.special)
            return pb.TokenizeResponse(token_ids=token_ids)

        return self._unary("Tokenize", request, context, tokenize)

    def Detokenize(self, request: pb.DetokenizeRequest, context):
        def detokenize():
            check_token_ids(request.token_ids, self._llm.config.n_vocab)
            return pb.DetokenizeResponse(text=self._llm.detokenize(list(request.token_ids)))

        return self._unary("Detokenize", request, context, detokenize)

    def ModelInfo(self, request: pb.ModelInfoRequest, context):
        return self._unary("ModelInfo", request, context, lambda: self._info)

    # ----- requests in -----

    def _check(self, request) -> None:
        if self._loop is None:
            raise NotReadyError("the server is loading and compiling the model; retry when its health is SERVING")
        size = request.ByteSize()
        if size > self._max_request_bytes:
            raise RequestError(
                f"the request is {size} bytes, over the server's limit of {self._max_request_bytes} bytes "
                "(--max-request-bytes)"
            )

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        if request.prompt and request.prompt_ids:
            raise RequestError("give the prompt as text (prompt) or as token ids (prompt_ids), not both")
        if request.prompt_ids:
            return list(request.prompt_ids)
        if not request.prompt:
            raise RequestError("the prompt is empty: give text in prompt or token ids in prompt_ids")
        return self._llm.tokenize(request.prompt)

    def _chat_prompt_ids(self, request: pb.ChatRequest) -> list[int]:
        functions, _ = chat_tools(request)
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        enable_thinking = request.enable_thinking if request.HasField("enable_thinking") else None
        return self._llm.chat_prompt_ids(messages, enable_thinking, functions=functions)

    def _generation_request(self, prompt_ids: list[int], request) -> GenerationRequest:
        options = request_options(request.options)
        _, forced = chat_tools(request) if isinstance(request, pb.ChatRequest) else ([], [])
        if forced:  # a required call: the grammar of its arguments, as every front adds it (rz.tools)
            options = RequestOptions.from_flat(**with_call_constraint(options.flat(), forced))
        generation = GenerationRequest(prompt_ids=tuple(prompt_ids), options=options)
        self._loop.engine.validate(generation)
        return generation

    # ----- calls: status codes and metrics -----

    def _unary(self, method: str, request, context, respond):
        status = grpc.StatusCode.OK
        try:
            self._check(request)
            return respond()
        except Exception as error:  # noqa: BLE001 - every failure becomes a status code
            status = status_of(error, method)
            context.abort(status, str(error))
        finally:
            self._metrics.requests.labels(method, status.name).inc()

    def _generate(self, method: str, request, context, prompt_ids_of):
        status = None  # None while streaming: a stream closed midway was cancelled
        ticket = None
        try:
            self._check(request)
            with _dropped_when_gone(context):
                prompt_ids = prompt_ids_of(request)
            generation = self._generation_request(prompt_ids, request)
            ticket = self._loop.submit(generation)
            loop = self._loop

            def on_termination():
                loop.cancel(ticket, _termination_reason(context))

            if not context.add_callback(on_termination):
                on_termination()
            context.send_initial_metadata(())  # tells the client it is queued
            with_tools = isinstance(request, pb.ChatRequest) and bool(request.tools) and request.tool_choice != "none"
            status = yield from _responses(ticket, request.request_id, with_tools)
        except Exception as error:  # noqa: BLE001 - every failure becomes a status code
            status = status_of(error, f"{method} {request.request_id!r}")
            context.abort(status, str(error))
        finally:
            if status is None:  # the stream was closed at a message: the request finished, or its caller left
                # gRPC may close the stream before it runs the termination callback.
                reason = ticket.cancel_reason or (None if ticket.done else _termination_reason(context))
                status = _CANCEL_STATUS.get(reason, grpc.StatusCode.OK)
            self._metrics.observe_request(method, status.name, ticket.sequence if ticket else None)


def _dropped_when_gone(context):
    """A context in which a long text being tokenized for this call is dropped once the call ends
    (its caller left, or its deadline passed)."""
    gone = threading.Event()
    if not context.add_callback(gone.set):
        gone.set()
    return long_texts.dropped_when(gone)


def _termination_reason(context) -> str:
    """Why a call ended early: its deadline, or its caller. gRPC's deadline timer may fire a
    little before time_remaining() reaches 0, so the last _DEADLINE_SLACK seconds count as past."""
    return DEADLINE_EXCEEDED if context.time_remaining() <= _DEADLINE_SLACK else CLIENT_CANCELLED


def status_of(error: Exception, call: str) -> grpc.StatusCode:
    """The status code for a failure; failures of the server, not of the request, are logged."""
    if isinstance(error, KVCacheCapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, (RequestError, TokenizerError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, ChatTemplateError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, (OverCapacityError, TemplateBusyError, TokenizerBusyError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, CallerGoneError):
        return grpc.StatusCode.CANCELLED
    if isinstance(error, (NotReadyError, ShuttingDownError)):
        return grpc.StatusCode.UNAVAILABLE
    # An EngineFailure's traceback was logged by the loop, where it happened.
    log.error("%s failed: %s", call, error, exc_info=not isinstance(error, EngineFailure))
    return grpc.StatusCode.INTERNAL


def _responses(ticket: Ticket, request_id: str, with_tools: bool = False):
    """Stream a ticket's events as messages, several per message when the reader fell behind;
    returns the call's status code, or raises the error that ended it. with_tools: the last
    message carries the tool calls parsed from the whole text."""
    sent = 0
    while True:
        items = [ticket.events.get()]
        while not _is_final(items[-1]) and not ticket.events.empty():
            items.append(ticket.events.get_nowait())
        last = items[-1]
        if isinstance(last, Cancelled):
            return _CANCEL_STATUS[last.reason]
        events = [item for item in items if isinstance(item, StepEvent)]
        if isinstance(last, EngineFailure) and ticket.sequence is not None:
            events.append(StepEvent(ticket.sequence, None, "", FinishReason.ERROR))
        if events:
            yield _message(ticket, events, sent, request_id, with_tools)
            sent += sum(event.token_id is not None for event in events)
        if isinstance(last, RzError):
            raise last
        if _is_final(last):
            return grpc.StatusCode.OK


def _is_final(item) -> bool:
    return not isinstance(item, StepEvent) or item.finish_reason is not None


def _message(ticket: Ticket, events: list[StepEvent], sent: int, request_id: str, with_tools: bool = False) -> pb.GenerateResponse:
    sequence = events[0].sequence
    token_ids = [event.token_id for event in events if event.token_id is not None]
    message = pb.GenerateResponse(text="".join(event.text for event in events), token_ids=token_ids)
    if ticket.request.options.sampling.n_logprobs:
        for entry in sequence.logprobs[sent : sent + len(token_ids)]:
            message.logprobs.add(
                token_id=entry["token"],
                logprob=entry["logprob"],
                top=[pb.TopLogprob(token_id=i, logprob=lp) for i, lp in entry["top"]],
            )
    finish_reason = events[-1].finish_reason
    if finish_reason is not None:
        prompt_tokens, completion_tokens = len(sequence.request.prompt_ids), len(sequence.output_ids)
        message.finish_reason = finish_reason_value(finish_reason)
        message.usage.CopyFrom(pb.Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens,
            cached_tokens=sequence.n_cached,
        ))
        message.timings.CopyFrom(pb.Timings(**sequence.timings.as_dict()))
        message.request_id = request_id
        if with_tools:
            message.tool_calls.extend(tool_calls_message(parse_tool_calls("".join(sequence.text))[1]))
    return message
