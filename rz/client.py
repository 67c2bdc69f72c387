"""rz.client: a Python client of rz's gRPC server (`python -m rz serve`), blocking and streaming.

>>> with Client("127.0.0.1:50051") as client:
...     client.generate("Once upon a time", max_tokens=32, temperature=0).text
...     for chunk in client.stream("The sky is", max_tokens=16):
...         print(chunk.text, end="")

Options are the Python API's (rz.LLM.generate, rz.request.FLAT_OPTIONS); left out, the server
uses RequestOptions' defaults, as rz.LLM does. Failures raise grpc.RpcError with the server's
status code and message (an unknown option raises rz.RequestError before sending).
"""

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rz.api.channel import open_channel
from rz.api.messages import finish_reason, options_message, tools_message
from rz.api.v1 import inference_pb2 as pb
from rz.api.v1 import inference_pb2_grpc as pb_grpc
from rz.request import Completion, FinishReason

DEFAULT_TARGET = "127.0.0.1:50051"


@dataclass(frozen=True)
class Chunk:
    """One streamed message, stamped on arrival."""

    text: str  # whole UTF-8 characters, never part of a stop string; may be empty
    token_ids: list[int]
    received_at: float  # time.perf_counter() when the message arrived
    logprobs: list[dict]  # per token: token, logprob, top [(id, logprob)], when asked for
    finish_reason: FinishReason | None = None  # the last chunk only
    usage: dict | None = None  # the last chunk only: prompt_tokens, completion_tokens, total_tokens, cached_tokens
    timings: dict | None = None  # the last chunk only: the server's seconds (queue, prefill, ttft, decode, total)
    tool_calls: list[dict] | None = None  # the last chunk of a chat with tools: OpenAI's tool_calls entries


class Client:
    """A connection to one rz server."""

    def __init__(
        self, target: str = DEFAULT_TARGET, timeout: float | None = None,
        api_key: str | None = None, tls: bool = False, tls_ca: str | None = None,
    ):
        """api_key: the server's --api-key; tls: connect over TLS; tls_ca: a PEM certificate to trust (implies tls)."""
        self.target = target
        self.timeout = timeout  # seconds per call unless a call says otherwise
        self._channel = open_channel(target, api_key, tls, tls_ca)
        self._stub = pb_grpc.InferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    # ----- generation -----

    def stream(
        self, prompt: str | Sequence[int], max_tokens: int | None = None, *, request_id: str = "",
        timeout: float | None = None, **options,
    ) -> Iterator[Chunk]:
        """Generate, yielding chunks as they arrive; closing the iterator early cancels the request."""
        request = pb.GenerateRequest(options=_options(max_tokens, options), request_id=request_id)
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_ids.extend(prompt)
        return _chunks(self._stub.Generate(request, timeout=self._timeout(timeout)))

    def generate(self, prompt: str | Sequence[int], max_tokens: int | None = None, **options) -> Completion:
        """Generate and wait for the whole completion."""
        return _completion(self.stream(prompt, max_tokens, **options))

    def chat_stream(
        self, messages: list[dict], max_tokens: int | None = None, *, request_id: str = "",
        timeout: float | None = None, tools: list[dict] | None = None, tool_choice: str = "",
        enable_thinking: bool | None = None, **options,
    ) -> Iterator[Chunk]:
        """Answer a conversation ([{"role": ..., "content": ...}]), yielding chunks as they arrive.

        tools: OpenAI's; tool_choice "auto", "none", "required" or a function's name. The calls
        come in the last chunk's tool_calls. enable_thinking goes to the chat template (Qwen3's
        thinking switch); None leaves the template's default.
        """
        request = pb.ChatRequest(
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
            options=_options(max_tokens, options),
            request_id=request_id,
            tools=tools_message(tools) if tools else [],
            tool_choice=tool_choice,
            enable_thinking=enable_thinking,
        )
        return _chunks(self._stub.Chat(request, timeout=self._timeout(timeout)))

    def chat(self, messages: list[dict], max_tokens: int | None = None, **options) -> Completion:
        """Answer a conversation and wait for the whole answer."""
        return _completion(self.chat_stream(messages, max_tokens, **options))

    # ----- tokens and model -----

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        request = pb.TokenizeRequest(text=text, special=special)
        if add_bos is not None:
            request.add_bos = add_bos
        return list(self._stub.Tokenize(request, timeout=self.timeout).token_ids)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._stub.Detokenize(pb.DetokenizeRequest(token_ids=ids), timeout=self.timeout).text

    def model_info(self) -> pb.ModelInfoResponse:
        """What the server runs: model, context size, vocabulary, quantization, kernels, slots."""
        return self._stub.ModelInfo(pb.ModelInfoRequest(), timeout=self.timeout)

    # ----- health -----

    def health(self, service: str = "") -> str:
        """The health service's status: SERVING, NOT_SERVING, ... (raises grpc.RpcError if unreachable)."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float, poll_seconds: float = 0.2) -> None:
        """Block until the server reports SERVING; TimeoutError after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} is not SERVING after {timeout:g} s")
            time.sleep(poll_seconds)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout


def _options(max_tokens: int | None, options: dict) -> pb.GenerationOptions:
    return options_message(options | {"max_tokens": max_tokens})


def _chunks(call) -> Iterator[Chunk]:
    finished = False
    try:
        for message in call:
            chunk = _chunk(message, time.perf_counter())
            finished = chunk.finish_reason is not None
            yield chunk
    finally:
        if not finished:
            call.cancel()  # the reader stopped early: free the server's slot now


def _chunk(message: pb.GenerateResponse, received_at: float) -> Chunk:
    logprobs = [
        {"token": entry.token_id, "logprob": entry.logprob, "top": [(top.token_id, top.logprob) for top in entry.top]}
        for entry in message.logprobs
    ]
    reason = finish_reason(message.finish_reason)
    if reason is None:
        return Chunk(message.text, list(message.token_ids), received_at, logprobs)
    return Chunk(
        message.text, list(message.token_ids), received_at, logprobs,
        finish_reason=reason,
        usage=_fields(message.usage),
        timings=_fields(message.timings),
        tool_calls=[
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            for call in message.tool_calls
        ] or None,
    )


def _completion(chunks: Iterator[Chunk]) -> Completion:
    text, token_ids, logprobs, last = [], [], [], None
    for last in chunks:
        text.append(last.text)
        token_ids.extend(last.token_ids)
        logprobs.extend(last.logprobs)
    if last is None or last.finish_reason is None:
        raise RuntimeError("the server ended the stream without a last message")
    return Completion(
        text="".join(text), token_ids=token_ids, finish_reason=last.finish_reason,
        usage=last.usage, timings=last.timings, logprobs=logprobs or None, tool_calls=last.tool_calls,
    )


def _fields(message) -> dict:
    return {field.name: getattr(message, field.name) for field in message.DESCRIPTOR.fields}
