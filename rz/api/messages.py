"""rz's request types to and from the rz.v1 messages: GenerationOptions fields are RequestOptions'
flat names, and each FINISH_REASON_<NAME> is FinishReason.<NAME>."""

import json

from rz.api.v1 import inference_pb2 as pb
from rz.errors import RequestError
from rz.request import FLAT_OPTIONS, FinishReason, RequestOptions
from rz.tools import ToolCall, forced_function, functions_of

_PREFIX = "FINISH_REASON_"


def options_message(options: dict) -> pb.GenerationOptions:
    """GenerationOptions from flat request options (RequestOptions.from_flat's names); None means unset."""
    given = {name: value for name, value in options.items() if value is not None}
    # Normalized (one stop string as a tuple of one) and checked as rz.LLM does: an unknown name fails here.
    flat = RequestOptions.from_flat(**given).flat()
    fields = {name: flat[name] for name in given if flat[name] is not None}
    if "response_format" in fields:
        fields["response_format"] = _format_message(fields["response_format"])
    if "logit_bias" in fields:
        fields["logit_bias"] = dict(fields["logit_bias"])
    return pb.GenerationOptions(**fields)


def request_options(message: pb.GenerationOptions) -> RequestOptions:
    """The RequestOptions a GenerationOptions asks for: a field left unset takes RequestOptions' default."""
    fields = message.DESCRIPTOR.fields_by_name
    given = {name: getattr(message, name) for name in FLAT_OPTIONS if not fields[name].has_presence or message.HasField(name)}
    if "response_format" in given:
        given["response_format"] = _format_dict(given["response_format"])
    given["logit_bias"] = dict(given["logit_bias"])
    repeated = {name: list(value) for name, value in given.items() if not isinstance(value, (bool, int, float, str, dict))}
    return RequestOptions.from_flat(**given | repeated)


def _format_message(response_format: dict) -> pb.ResponseFormat:
    """A response_format option (rz.constraints.constraint_of's shape) as its message."""
    kind = response_format["type"]
    if kind == "json_schema":
        return pb.ResponseFormat(type=kind, json_schema=json.dumps(response_format["json_schema"]["schema"]))
    return pb.ResponseFormat(type=kind, **({kind: response_format[kind]} if kind in ("regex", "lark") else {}))


def _format_dict(message: pb.ResponseFormat) -> dict:
    """A ResponseFormat message as the response_format option; RequestError if its schema is not JSON."""
    if message.type != "json_schema":
        return {"type": message.type} | ({message.type: getattr(message, message.type)} if message.type in ("regex", "lark") else {})
    try:
        schema = json.loads(message.json_schema or "{}")
    except ValueError as error:
        raise RequestError(f"response_format.json_schema is not valid JSON: {error}") from None
    return {"type": "json_schema", "json_schema": {"schema": schema}}


def tools_message(tools: list[dict]) -> list[pb.Tool]:
    """OpenAI's tools ([{"type": "function", "function": {...}}]) as Tool messages."""
    return [
        pb.Tool(name=f["name"], description=f["description"], parameters=json.dumps(f["parameters"]))
        for f in functions_of(tools)
    ]


def chat_tools(request: pb.ChatRequest) -> tuple[list[dict], list[dict]]:
    """(the functions a ChatRequest offers, those one of which its answer must call): rz.tools' shapes."""
    if not request.tools:
        if request.tool_choice not in ("", "none", "auto"):
            raise RequestError("tool_choice needs tools")
        return [], []
    tools = []
    for i, tool in enumerate(request.tools):
        try:
            parameters = json.loads(tool.parameters) if tool.parameters else {"type": "object"}
        except ValueError as error:
            raise RequestError(f"tools[{i}].parameters is not valid JSON: {error}") from None
        tools.append({"type": "function", "function": {"name": tool.name, "description": tool.description, "parameters": parameters}})
    functions = functions_of(tools)
    choice = request.tool_choice or "auto"
    if choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    offered, forced = forced_function(choice, functions)
    return (functions if offered else []), forced


def tool_calls_message(calls: list[ToolCall]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments) for call in calls]


def finish_reason_value(reason: FinishReason) -> int:
    return pb.FinishReason.Value(_PREFIX + reason.name)


def finish_reason(value: int) -> FinishReason | None:
    """The FinishReason of a message's finish_reason; None while unfinished (FINISH_REASON_UNSPECIFIED)."""
    name = pb.FinishReason.Name(value).removeprefix(_PREFIX)
    return None if name == "UNSPECIFIED" else FinishReason[name]
