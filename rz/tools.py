"""Tool calls (OpenAI's `tools`): the tools into the chat prompt, the model's calls out of its text.

Into the prompt: a chat template that reads `tools` is handed them, as llama.cpp hands them; a
template that does not (SmolLM2's, Gemma 3's) gets a system message that lists them and asks for
Hermes's format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as llama.cpp's generic
handler does (in its own JSON shape) for such templates.

Out of the text: Hermes/Qwen's `<tool_call>{...}</tool_call>`, Mistral's `[TOOL_CALLS][{...}, ...]`
and Llama 3's bare JSON `{"name": ..., "parameters": {...}}` (after an optional <|python_tag|>).

tool_choice "required" or a named function constrains the output with a grammar (Lark with
llguidance's %json) that allows only a Hermes call whose arguments match the function's
parameters schema.

Every front shares this module: the OpenAI and Ollama routes, rz.v1's Chat, and rz.LLM.chat.
"""

import json
import re
import uuid
from dataclasses import dataclass

from rz.constraints import Constraint, response_format_of
from rz.errors import RequestError

_HERMES_OPEN, _HERMES_CLOSE = "<tool_call>", "</tool_call>"
_MISTRAL = "[TOOL_CALLS]"
_PYTHON_TAG = "<|python_tag|>"
# Where a call may begin: anywhere for the tagged formats, only at the start for Llama 3's bare JSON.
_MARKERS = (_HERMES_OPEN, _MISTRAL, _PYTHON_TAG)
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# The calls' JSON as llguidance writes it under a grammar: one line, like rz.constraints' JSON.
_JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: OpenAI's message.tool_calls[i] once rendered by as_openai."""

    name: str
    arguments: str  # JSON text
    id: str

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def as_ollama(self) -> dict:
        """Ollama's message.tool_calls[i]: the arguments as an object, not JSON text."""
        return {"function": {"name": self.name, "arguments": json.loads(self.arguments)}}


def functions_of(tools) -> list[dict]:
    """OpenAI's `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}]) as the functions."""
    if not isinstance(tools, list) or not tools:
        raise RequestError("tools must be a non-empty array of {'type': 'function', 'function': {...}} objects")
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not _NAME.match(function["name"]):
            raise RequestError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': {{...}}}}}} "
                               "with a name of letters, digits, '_', '.' or '-' (at most 64)")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, dict):
            raise RequestError(f"tools[{i}].function.parameters must be a JSON schema object")
        functions.append({"name": function["name"], "description": function.get("description", ""), "parameters": parameters})
    return functions


def forced_function(tool_choice, functions: list[dict]) -> tuple[bool, list[dict]]:
    """(whether tools are offered at all, the functions a call must use if one is required, else [])
    for OpenAI's tool_choice: "auto" (the default), "none", "required", or a named function."""
    if tool_choice in (None, "auto"):
        return True, []
    if tool_choice == "none":
        return False, []
    if tool_choice == "required":
        return True, functions
    named = isinstance(tool_choice, dict) and tool_choice.get("type") == "function" and isinstance(tool_choice.get("function"), dict)
    chosen = [f for f in functions if named and f["name"] == tool_choice["function"].get("name")]
    if not chosen:
        raise RequestError(f"tool_choice must be \"none\", \"auto\", \"required\" or {{'type': 'function', 'function': "
                           f"{{'name': ...}}}} naming one of the tools, got {json.dumps(tool_choice)[:100]}")
    return True, chosen


def is_past_call(call) -> bool:
    """Whether a message's tool_calls entry is a call, as OpenAI ({"id", "type", "function"}) or Ollama
    ({"function"}) send them back: a function with a name, and arguments as JSON text or an object."""
    function = call.get("function") if isinstance(call, dict) else None
    return (isinstance(function, dict) and isinstance(function.get("name"), str)
            and isinstance(function.get("arguments", ""), (str, dict)))


def offered_functions(tools, tool_choice) -> tuple[list[dict], list[dict]]:
    """(the functions offered to the model, those one of which its answer must call) for OpenAI's
    `tools` (None: no tools) and `tool_choice`; RequestError if either is malformed."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise RequestError("tool_choice needs tools")
        return [], []
    functions = functions_of(tools)
    offered, forced = forced_function(tool_choice, functions)
    return (functions if offered else []), forced


def with_call_constraint(options: dict, forced: list[dict]) -> dict:
    """Flat generation options (or a request body with their names) whose output must be a call of
    one of the forced functions; RequestError if they constrain the output already."""
    if not forced:
        return options
    if options.get("response_format") is not None or options.get("grammar") is not None:
        raise RequestError('tool_choice "required" or a named function constrains the output itself: '
                           "leave out response_format and grammar")
    response_format, grammar = response_format_of(call_constraint(forced))
    return options | {"response_format": response_format, "grammar": grammar}


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders the `tools` it is handed."""
    return template is not None and "tools" in template


def tool_system_prompt(functions: list[dict]) -> str:
    """The instructions for a template that does not render tools: the tools and Hermes's call format."""
    listing = "\n".join(json.dumps({"type": "function", "function": f}) for f in functions)
    return (
        "You may call one or more functions to answer. The functions:\n"
        f"<tools>\n{listing}\n</tools>\n"
        f'To call a function, answer with {_HERMES_OPEN}{{"name": <function name>, "arguments": <arguments object>}}'
        f"{_HERMES_CLOSE}, one per call, and nothing else."
    )


def with_tool_prompt(messages: list[dict], functions: list[dict]) -> list[dict]:
    """Messages for a template that knows no tools: the tool instructions in the system message (a new
    first one, if there is none), earlier calls written out in Hermes's format, and each tool's result
    as a user turn in <tool_response> tags (Hermes's convention)."""
    prompt = tool_system_prompt(functions)
    messages = [_as_plain_message(message) for message in messages]
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{prompt}"}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def _as_plain_message(message: dict) -> dict:
    if message.get("role") == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>"}
    calls = message.get("tool_calls") or []
    written = "".join(
        f"{_HERMES_OPEN}{json.dumps({'name': call['function']['name'], 'arguments': _arguments(call['function'])})}{_HERMES_CLOSE}"
        for call in calls
    )
    return {"role": message["role"], "content": message.get("content", "") + written}


def _arguments(function: dict):
    """A past call's arguments as an object (OpenAI sends them as JSON text, Ollama as an object), else as given."""
    arguments = function.get("arguments", {})
    parsed = _arguments_object(arguments)
    return parsed if parsed is not None else arguments


def call_constraint(functions: list[dict]) -> Constraint:
    """A grammar allowing exactly one Hermes call of one of the functions, its arguments valid against its schema."""
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for f in functions
        ],
        "x-guidance": _JSON_LAYOUT,
    }
    return Constraint("lark", f"start: {json.dumps(_HERMES_OPEN)} %json {json.dumps(schema)} {json.dumps(_HERMES_CLOSE)}")


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(the text outside any call, stripped; the calls) of a model's answer, in any of the three formats."""
    calls: list[ToolCall] = []
    rest = []
    position = 0
    decoder = json.JSONDecoder()
    stripped = text.strip()
    bare = stripped.removeprefix(_PYTHON_TAG).lstrip()
    if bare.startswith("{"):  # Llama 3's bare JSON: the whole answer is one call
        found = _calls_in(bare, decoder)
        if found is not None and found[1].strip() == "":
            return "", found[0]
    while True:
        starts = [(text.find(marker, position), marker) for marker in (_HERMES_OPEN, _MISTRAL)]
        starts = [(index, marker) for index, marker in starts if index >= 0]
        if not starts:
            rest.append(text[position:])
            break
        index, marker = min(starts)
        found = _calls_in(text[index + len(marker):].lstrip(), decoder)
        if found is None:
            rest.append(text[position:])
            break
        rest.append(text[position:index])
        calls.extend(found[0])
        after = found[1].lstrip()
        if marker == _HERMES_OPEN:
            after = after.removeprefix(_HERMES_CLOSE)
        position = len(text) - len(after)
    return "".join(rest).strip(), calls


def _calls_in(text: str, decoder: json.JSONDecoder) -> tuple[list[ToolCall], str] | None:
    """The calls in the JSON value that text starts with (an object, or an array of objects), and what follows it."""
    try:
        value, end = decoder.raw_decode(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        arguments = _arguments_object(item.get("arguments", item.get("parameters"))) if isinstance(item, dict) else None
        if arguments is None or not isinstance(item.get("name"), str):
            return None
        calls.append(ToolCall(item["name"], json.dumps(arguments), _call_id()))
    return calls, text[end:]


def _arguments_object(arguments) -> dict | None:
    """A call's arguments as an object; some models write them as JSON text. None if they are not an object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    return arguments if isinstance(arguments, dict) else None


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ToolCallStream:
    """A streamed answer with tools offered: text passes through until a call may be starting;
    from there it is held, and parsed into calls when the answer ends."""

    def __init__(self):
        self._held = ""
        self._started = False  # some text has been let through: a bare JSON call can no longer start

    def feed(self, text: str) -> str:
        """The part of text that is certainly not a call: send it now."""
        self._held += text
        if not self._held:
            return ""
        cut = self._possible_call_start()
        out, self._held = self._held[:cut], self._held[cut:]
        self._started = self._started or bool(out.strip())
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The held text that turned out not to be calls, and the calls."""
        held, self._held = self._held, ""
        content, calls = parse_tool_calls(held)
        return (content if calls else held), calls

    def _possible_call_start(self) -> int:
        """Where the held text may begin a call: at a marker, at the start of a marker cut off at
        its end, or (before any text) at an opening brace; else its end."""
        held = self._held
        if not self._started and held.lstrip()[:1] in ("{", ""):
            return 0
        starts = [held.find(marker) for marker in _MARKERS]
        starts = [index for index in starts if index >= 0]
        if starts:
            return min(starts)
        for length in range(min(len(held), max(map(len, _MARKERS)) - 1), 0, -1):
            if any(marker.startswith(held[-length:]) for marker in _MARKERS):
                return len(held) - length
        return len(held)
