"""The Ollama-compatible routes: /api/generate, /api/chat (NDJSON streams unless "stream": false),
/api/tags, /api/show, /api/ps, /api/version. Errors are {"error": "..."}.

One model is served, whatever name a request gives; `options.num_ctx` may only lower the context
the server was started with. `format` ("json" or a JSON schema) constrains the output (rz.constraints);
`think` (true or false) is the chat template's enable_thinking (Qwen3's thinking switch).
/api/chat's `tools` are offered as OpenAI's are (rz.tools); the calls the model makes come back in
message.tool_calls, their arguments as objects, in a line of their own before the last when streamed.
"""

import datetime
import json
from functools import partial

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import rz
from rz.errors import RequestError
from rz.request import FinishReason
from rz.server.http_common import (
    CLIENT_CLOSED, Backend, HttpError, field, http_status, run_sync, run_while_connected, stop_strings,
    unless_disconnected,
)
from rz.tools import ToolCallStream, functions_of, is_past_call, parse_tool_calls

_ROLES = ("system", "user", "assistant", "tool")
_DONE_REASON = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.CANCELLED: "stop", FinishReason.ERROR: "stop"}
# Ollama's option -> (rz's flat option, kind)
_OPTIONS = {
    "num_predict": ("max_tokens", int), "temperature": ("temperature", float), "top_k": ("top_k", int),
    "top_p": ("top_p", float), "min_p": ("min_p", float), "seed": ("seed", int), "repeat_penalty": ("repeat_penalty", float),
    "repeat_last_n": ("penalty_last_n", int), "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": message}


def routes(backend: Backend) -> list[Route]:
    async def generate(request: Request):
        body = await backend.json(request)
        attached = backend.ready()
        prompt = field(body, "prompt", str, "")
        system = field(body, "system", str)
        if not prompt:
            # Ollama answers an empty prompt by loading the model: here it is always loaded.
            return JSONResponse(_final(attached, body, None) | {"response": "", "done_reason": "load"})
        if field(body, "raw", bool, False):
            prompt_ids = await run_while_connected(request, attached.llm.tokenize, prompt)
        else:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            prompt_ids = await _chat_ids(request, attached.llm, messages, [], field(body, "think", bool))
        return await _respond(request, backend, body, prompt_ids, chat=False)

    async def chat(request: Request):
        body = await backend.json(request)
        attached = backend.ready()
        messages = _messages(body.get("messages"))
        functions = _functions(body.get("tools"))
        prompt_ids = await _chat_ids(request, attached.llm, messages, functions, field(body, "think", bool))
        return await _respond(request, backend, body, prompt_ids, chat=True, tools=bool(functions))

    async def tags(request: Request):
        attached = backend.ready()
        return JSONResponse({"models": [_listing(attached)]})

    async def ps(request: Request):
        attached = backend.ready()
        entry = _listing(attached) | {"expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                                      "context_length": attached.loop.engine.n_ctx}
        return JSONResponse({"models": [entry]})

    async def show(request: Request):
        await backend.json(request)
        attached = backend.ready()
        config = attached.llm.config
        return JSONResponse({
            "modelfile": "", "parameters": "", "template": config.chat_template or "",
            "details": _details(attached),
            "model_info": {
                "general.architecture": config.architecture,
                "general.name": config.name,
                f"{config.architecture}.context_length": config.context_length,
                f"{config.architecture}.vocab_size": config.n_vocab,
            },
            "capabilities": ["completion"],
            "modified_at": _modified(attached),
        })

    async def version(request: Request):
        return JSONResponse({"version": rz.__version__})

    return [
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/chat", chat, methods=["POST"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/api/version", version, methods=["GET"]),
    ]


def _messages(value) -> list[dict]:
    """Ollama's chat messages as the chat template takes them: roles and content checked, past tool calls kept."""
    if not isinstance(value, list) or not value:
        raise HttpError(400, "'messages' must be a non-empty array of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in _ROLES or not isinstance(message.get("content") or "", str):
            raise HttpError(400, f"messages[{i}] must be an object with a role ({', '.join(_ROLES)}) and string content")
        entry = {"role": message["role"], "content": message.get("content") or ""}
        calls = message.get("tool_calls")
        if calls is not None:
            if message["role"] != "assistant" or not isinstance(calls, list) or not all(map(is_past_call, calls)):
                raise HttpError(400, f"messages[{i}].tool_calls must be an assistant's array of "
                                "{'function': {'name': ..., 'arguments': {...}}}")
            entry["tool_calls"] = [{"type": "function", "function": call["function"]} for call in calls]
        messages.append(entry)
    return messages


def _functions(tools) -> list[dict]:
    """The functions of a chat's `tools` (OpenAI's shape, which Ollama takes); none without tools
    (the ollama client sends an empty array)."""
    if tools is None or tools == []:
        return []
    try:
        return functions_of(tools)
    except RequestError as error:
        raise HttpError(400, str(error)) from None


async def _chat_ids(request: Request, llm, messages: list[dict], functions: list[dict], think: bool | None) -> list[int]:
    """The chat template's prompt; `think` (Ollama's) is its enable_thinking (Qwen3's switch)."""
    try:
        return await run_while_connected(request, partial(llm.chat_prompt_ids, messages, think, functions=functions))
    except RequestError as error:
        raise HttpError(400, str(error)) from None


def _options(body: dict, n_prompt: int, n_ctx: int) -> dict:
    """rz's flat generation options from an Ollama request's `options`."""
    given = field(body, "options", dict, {})
    options = {}
    for name, (option, kind) in _OPTIONS.items():
        value = field(given, name, kind)
        if value is not None:
            options[option] = value
    num_ctx = field(given, "num_ctx", int, n_ctx)
    if not 1 <= num_ctx <= n_ctx:
        raise HttpError(400, f"options.num_ctx must be in [1, {n_ctx}] (the server's context size; restart it with a larger --n-ctx)")
    max_tokens = options.get("max_tokens", -1)
    if max_tokens < 0:  # Ollama's -1: until the context is full
        options["max_tokens"] = max(1, num_ctx - n_prompt)
    elif n_prompt + max_tokens > num_ctx:
        raise HttpError(400, f"the prompt ({n_prompt} tokens) plus num_predict ({max_tokens}) exceed num_ctx ({num_ctx})")
    options["stop"] = stop_strings(given.get("stop"), "options.stop")
    options["response_format"] = _response_format(body.get("format"))
    return options


def _response_format(value) -> dict | None:
    """Ollama's `format` ("json" or a JSON schema) as OpenAI's response_format."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"schema": value}}
    raise HttpError(400, f"'format' must be \"json\" or a JSON schema object, got {json.dumps(value)[:80]}")


async def _respond(request: Request, backend: Backend, body: dict, prompt_ids: list[int], chat: bool, tools: bool = False):
    """The answer, streamed or whole; tools: tools were offered, so the answer's calls become message.tool_calls."""
    attached = backend.ready()
    options = _options(body, len(prompt_ids), attached.loop.engine.n_ctx)
    stream = field(body, "stream", bool, True)
    method = "POST /api/chat" if chat else "POST /api/generate"
    tickets = await run_sync(backend.submit, prompt_ids, options)
    events = backend.events(tickets, method)

    def part(text: str, calls: list = ()) -> dict:
        if not chat:
            return {"response": text}
        message = {"role": "assistant", "content": text}
        return {"message": message | {"tool_calls": [call.as_ollama() for call in calls]} if calls else message}

    if not stream:

        async def whole(events) -> dict:
            text, sequence = "", None
            async for _, event in events:
                text += event.text
                sequence = event.sequence
            content, calls = parse_tool_calls(text) if tools else (text, [])
            return _final(attached, body, sequence) | part(content if calls else text, calls)

        answer = await unless_disconnected(request, events, whole)
        return JSONResponse(answer) if answer is not None else Response(status_code=CLIENT_CLOSED)

    held = ToolCallStream() if tools else None

    def chunk(text: str, calls: list = ()) -> bytes:
        return _line({"model": _name(attached, body), "created_at": _now(), "done": False} | part(text, calls))

    async def lines():
        try:
            async for _, event in events:
                text = held.feed(event.text) if held is not None else event.text
                if event.finish_reason is not None and held is not None:
                    tail, calls = held.finish()
                    if calls:  # as Ollama sends them: a line with the calls, then the last line
                        yield chunk(text + tail, calls)
                        text = ""
                    else:
                        text += tail
                if event.finish_reason is not None:
                    yield _line(_final(attached, body, event.sequence) | part(text))
                elif text:
                    yield chunk(text)
        except Exception as error:  # noqa: BLE001 - the stream has begun: the failure is its last line
            http_status(error, method)  # logs a failure of the server's own
            yield _line({"error": str(error)})

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _final(attached, body: dict, sequence) -> dict:
    """The last object of an answer: why it ended, with counts and durations in nanoseconds.
    prompt_eval_count counts the whole prompt, and prompt_eval_cached_count the part the KV cache
    served, as Ollama's own API does."""
    final = {"model": _name(attached, body), "created_at": _now(), "done": True, "done_reason": "stop",
             "total_duration": 0, "load_duration": 0, "prompt_eval_count": 0, "prompt_eval_duration": 0,
             "eval_count": 0, "eval_duration": 0}
    if sequence is not None:
        timings = sequence.timings.as_dict()
        final |= {
            "done_reason": _DONE_REASON[sequence.finish_reason or FinishReason.STOP],
            "total_duration": _ns(timings["total_seconds"]),
            "prompt_eval_count": len(sequence.request.prompt_ids),
            "prompt_eval_cached_count": sequence.n_cached,
            "prompt_eval_duration": _ns(timings["prefill_seconds"]),
            "eval_count": len(sequence.output_ids),
            "eval_duration": _ns(timings["decode_seconds"]),
        }
    return final


def _name(attached, body: dict) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else attached.model_name


def _listing(attached) -> dict:
    return {"name": attached.model_name, "model": attached.model_name, "modified_at": _modified(attached),
            "size": attached.llm.path.stat().st_size,
            "digest": "", "details": _details(attached)}


def _details(attached) -> dict:
    config = attached.llm.config
    return {"format": "gguf", "family": config.architecture, "families": [config.architecture],
            "parameter_size": "", "quantization_level": ""}


def _modified(attached) -> str:
    stamp = attached.llm.path.stat().st_mtime
    return datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _line(payload: dict) -> bytes:
    return json.dumps(payload).encode() + b"\n"
