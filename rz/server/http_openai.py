"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Request fields map onto rz's flat generation options; fields OpenAI does not define (top_k,
min_p, repeat_penalty, ignore_eos, cache_prompt) are taken as llama-server takes them, and so is rz's own
`speculative`. A field left out gets rz's default (llama.cpp's), not OpenAI's. Structured output is
OpenAI's `response_format` (json_object, json_schema, and rz's regex and lark types) or
llama-server's GBNF `grammar`; `tools` and `tool_choice` are OpenAI's (rz.tools), and
`chat_template_kwargs` llama-server's (its enable_thinking only: Qwen3's thinking switch). Streams are
server-sent events ending in `data: [DONE]`; a failure midway ends the stream with an error event.
"""

import json
import time
import uuid
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from rz.errors import RequestError
from rz.request import FinishReason
from rz.server.http_common import (
    CLIENT_CLOSED, Backend, HttpError, field, http_status, run_sync, run_while_connected, stop_strings,
    unless_disconnected, usage,
)
from rz.tools import ToolCallStream, is_past_call, offered_functions, parse_tool_calls, with_call_constraint

# The most choices one request may ask for: each takes a slot of its own.
MAX_CHOICES = 16
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "stop", FinishReason.ERROR: "stop"}
# The field a sampling option is read from, when OpenAI's name is not rz's flat name.
_EXTRAS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty",
    "repeat_penalty": "repeat_penalty", "repetition_penalty": "repeat_penalty",
}
_INTEGERS = {"top_k", "seed"}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error object."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "rate_limit_error", 503: "server_unavailable_error"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"), "param": param, "code": None}}


def routes(backend: Backend) -> list[Route]:
    async def models(request: Request):
        attached = backend.ready()
        return JSONResponse({"object": "list", "data": [_model(attached.model_name)]})

    async def model(request: Request):
        attached = backend.ready()
        if request.path_params["model"] != attached.model_name:
            raise HttpError(404, f"the model '{request.path_params['model']}' does not exist; this server runs "
                            f"'{attached.model_name}'", param="model")
        return JSONResponse(_model(attached.model_name))

    async def completions(request: Request):
        body = await backend.json(request)
        prompt = body.get("prompt")
        llm = backend.ready().llm
        if isinstance(prompt, str):
            if not prompt:
                raise HttpError(400, "'prompt' is empty", param="prompt")
            prompt_ids = await run_while_connected(request, llm.tokenize, prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt_ids = prompt
        elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt_ids = await run_while_connected(request, llm.tokenize, prompt[0])
        else:
            raise HttpError(400, "'prompt' must be a non-empty string or an array of token ids "
                            "(several prompts in one request are not supported)", param="prompt")
        n_logprobs = field(body, "logprobs", int)
        if n_logprobs is not None and not 0 <= n_logprobs <= 5:
            raise HttpError(400, "'logprobs' must be in [0, 5]", param="logprobs")
        return await _respond(request, backend, body, prompt_ids, n_logprobs, chat=False, default_max_tokens=16)

    async def chat_completions(request: Request):
        body = await backend.json(request)
        llm = backend.ready().llm
        messages = _messages(body.get("messages"))
        functions, forced = _tools(body)
        enable_thinking = _enable_thinking(body)
        try:
            prompt_ids = await run_while_connected(request, partial(llm.chat_prompt_ids, messages, enable_thinking, functions=functions))
        except RequestError as error:
            raise HttpError(400, str(error), param="messages") from None
        try:
            body = with_call_constraint(body, forced)
        except RequestError as error:
            raise HttpError(400, str(error), param="tool_choice") from None
        n_logprobs = None
        if field(body, "logprobs", bool, False):
            n_logprobs = field(body, "top_logprobs", int, 0)
        elif body.get("top_logprobs") is not None:
            raise HttpError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return await _respond(request, backend, body, prompt_ids, n_logprobs, chat=True, default_max_tokens=None,
                              tools=bool(functions))

    return [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]


def _enable_thinking(body: dict) -> bool | None:
    """chat_template_kwargs' enable_thinking (llama.cpp's server: Qwen3's thinking switch), or None.
    rz's templates take no other variable from a request, so any other key is refused."""
    kwargs = field(body, "chat_template_kwargs", dict, {})
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise HttpError(400, f"chat_template_kwargs: rz takes only enable_thinking, not {', '.join(unknown)}", param="chat_template_kwargs")
    return field(kwargs, "enable_thinking", bool)


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "rz"}


def _tools(body: dict) -> tuple[list[dict], list[dict]]:
    """(the functions offered as tools, the functions one of which the answer must call) from tools and tool_choice."""
    try:
        return offered_functions(body.get("tools"), body.get("tool_choice"))
    except RequestError as error:
        raise HttpError(400, str(error), param="tools" if body.get("tools") is not None else "tool_choice") from None


def _messages(value) -> list[dict]:
    """OpenAI chat messages as the chat template takes them: roles checked, text parts joined, tool calls
    and results kept."""
    if not isinstance(value, list) or not value:
        raise HttpError(400, "'messages' must be a non-empty array of messages", param="messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise HttpError(400, f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in _ROLES:
            raise HttpError(400, f"{where}.role must be one of {', '.join(_ROLES)}, got {json.dumps(role)[:50]}", param=f"{where}.role")
        entry = {"role": _ROLES[role], "content": _content(message.get("content"), f"{where}.content")}
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list) or not all(map(is_past_call, calls)):
                raise HttpError(400, f"{where}.tool_calls must be an assistant's array of {{'id', 'type': 'function', "
                                "'function': {'name', 'arguments'}}", param=f"{where}.tool_calls")
            entry["tool_calls"] = calls
        if isinstance(message.get("tool_call_id"), str):
            entry["tool_call_id"] = message["tool_call_id"]
        messages.append(entry)
    return messages


def _content(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise HttpError(400, f"{where} may hold only text parts ({{'type': 'text', 'text': ...}}); "
                                "this server runs a text-only model", param=where)
            texts.append(part["text"])
        return "".join(texts)
    raise HttpError(400, f"{where} must be a string or an array of text parts", param=where)


def _options(body: dict, n_logprobs: int | None, n_prompt: int, n_ctx: int, default_max_tokens: int | None) -> dict:
    """rz's flat generation options from an OpenAI request's fields."""
    # OpenAI's {"token id": bias} map, or llama-server's [[token id, bias], ...]; false bans (rz.request.logit_bias_of).
    options = {"logit_bias": field(body, "logit_bias", (dict, list))}
    for name, option in _EXTRAS.items():
        value = field(body, name, int if name in _INTEGERS else float)
        if value is not None:
            options[option] = value
    max_tokens = field(body, "max_completion_tokens", int, field(body, "max_tokens", int))
    options["max_tokens"] = max_tokens if max_tokens is not None else (default_max_tokens or max(1, n_ctx - n_prompt))
    options["stop"] = stop_strings(body.get("stop"))
    options["ignore_eos"] = field(body, "ignore_eos", bool, False)
    options["cache_prompt"] = field(body, "cache_prompt", bool, True)  # False: prefill the whole prompt
    speculative = field(body, "speculative", str)  # rz's own: a proposer, or "off" (rz.speculative)
    if speculative is not None:
        options["speculative"] = speculative
    # Structured output: OpenAI's response_format, or llama-server's GBNF grammar (rz.constraints).
    options["response_format"] = field(body, "response_format", dict)
    options["grammar"] = field(body, "grammar", str)
    if n_logprobs is not None:
        options["logprobs"] = max(n_logprobs, 1)  # the sampled token's own log-probability comes with the top ones
    return options


async def _respond(request: Request, backend: Backend, body: dict, prompt_ids: list[int], n_logprobs: int | None,
                   chat: bool, default_max_tokens: int | None, tools: bool = False):
    attached = backend.ready()
    n = field(body, "n", int, 1)
    if not 1 <= n <= MAX_CHOICES:
        raise HttpError(400, f"'n' must be in [1, {MAX_CHOICES}]", param="n")
    options = _options(body, n_logprobs, len(prompt_ids), attached.loop.engine.n_ctx, default_max_tokens)
    stream = field(body, "stream", bool, False)
    include_usage = field(field(body, "stream_options", dict, {}), "include_usage", bool, False)
    method = "POST /v1/chat/completions" if chat else "POST /v1/completions"
    tickets = await run_sync(backend.submit, prompt_ids, options, n)
    reply = _Reply(attached, chat, n_logprobs, tools)
    events = backend.events(tickets, method)
    if stream:
        return StreamingResponse(_sse(reply, events, tickets, include_usage, method), media_type="text/event-stream")
    async def whole(events) -> list[dict]:
        texts, logprobs, finish = [""] * n, [[] for _ in range(n)], [None] * n
        async for index, event in events:
            texts[index] += event.text
            if event.token_id is not None and n_logprobs is not None:
                logprobs[index].append(event.sequence.logprobs[len(logprobs[index])])
            finish[index] = event.finish_reason
        choices = []
        for i in range(n):
            content, calls = parse_tool_calls(texts[i]) if tools else (texts[i], [])
            choices.append(reply.choice(i, content if calls else texts[i], logprobs[i], finish[i], final=True, calls=calls))
        return choices

    choices = await unless_disconnected(request, events, whole)
    if choices is None:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(reply.envelope(choices) | {"usage": usage([t.sequence for t in tickets])})


class _Reply:
    """The shapes of one request's answer: chat or legacy completions, whole or in chunks."""

    def __init__(self, attached, chat: bool, n_logprobs: int | None, tools: bool = False):
        self.chat = chat
        self.tools = tools  # tools were offered: the answer's calls become message.tool_calls
        self.n_logprobs = n_logprobs
        self.tokenizer = attached.llm.tokenizer
        self.model = attached.model_name
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def envelope(self, choices: list[dict], chunk: bool = False) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def choice(self, index: int, text: str, logprobs: list[dict], finish, final: bool, delta: bool = False,
               calls: list = ()) -> dict:
        """One choice; calls (rz.tools.ToolCall) go into tool_calls, and make the finish reason "tool_calls"."""
        finish_reason = _FINISH[finish] if finish is not None else None
        if calls and finish_reason == "stop":
            finish_reason = "tool_calls"
        if self.chat:
            body = {"role": "assistant", "content": text} if final or delta else {}
            if calls:
                body = {"role": "assistant", "content": text or None, "tool_calls": [
                    call.as_openai() | ({"index": i} if delta else {}) for i, call in enumerate(calls)
                ]}
            choice = {"index": index, ("delta" if delta else "message"): body}
            choice["logprobs"] = {"content": [self._chat_logprob(e) for e in logprobs]} if self.n_logprobs is not None else None
        else:
            choice = {"index": index, "text": text, "logprobs": self._legacy_logprobs(logprobs) if self.n_logprobs is not None else None}
        choice["finish_reason"] = finish_reason
        return choice

    def _piece(self, token_id: int) -> bytes:
        return self.tokenizer.token_to_piece(token_id)

    def _chat_logprob(self, entry: dict) -> dict:
        def one(token_id: int, logprob: float) -> dict:
            piece = self._piece(token_id)
            return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}

        return one(entry["token"], entry["logprob"]) | {
            "top_logprobs": [one(i, lp) for i, lp in entry["top"][: self.n_logprobs]]
        }

    def _legacy_logprobs(self, entries: list[dict]) -> dict:
        tokens = [self._piece(e["token"]).decode("utf-8", "replace") for e in entries]
        offsets, offset = [], 0
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [
                {self._piece(i).decode("utf-8", "replace"): lp for i, lp in e["top"][: self.n_logprobs]} for e in entries
            ],
            "text_offset": offsets,
        }


async def _sse(reply: _Reply, events, tickets, include_usage: bool, method: str):
    """Server-sent events: one chunk per event, a usage chunk when asked, then [DONE] (or an error event)."""
    sent = [0] * len(tickets)
    held = [ToolCallStream() for _ in tickets] if reply.tools else None
    if reply.chat:
        for index in range(len(tickets)):
            yield _data(reply.envelope([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}], chunk=True))
    try:
        async for index, event in events:
            entries = []
            if event.token_id is not None and reply.n_logprobs is not None:
                entries = [event.sequence.logprobs[sent[index]]]
                sent[index] += 1
            text, calls = event.text, []
            if held is not None:
                text = held[index].feed(text)
                if event.finish_reason is not None:
                    tail, calls = held[index].finish()
                    text += tail
            if not text and not entries and not calls and event.finish_reason is None:
                continue
            choice = reply.choice(index, text, entries, event.finish_reason, final=False, delta=bool(text or calls), calls=calls)
            yield _data(reply.envelope([choice], chunk=True) | ({"usage": None} if include_usage else {}))
    except Exception as error:  # noqa: BLE001 - the stream has begun: the failure goes out as its last event
        status = http_status(error, method)
        yield _data(error_body(status, str(error)))
        return
    if include_usage:
        yield _data(reply.envelope([], chunk=True) | {"usage": usage([t.sequence for t in tickets])})
    yield b"data: [DONE]\n\n"


def _data(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"
