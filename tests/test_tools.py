"""rz.tools: tools into the prompt, tool calls out of the text (three formats, whole or streamed)."""

import json

import jsonschema
import pytest

import rz
from rz.errors import RequestError
from rz.model_files import smollm2_135m_path
from rz.request import FinishReason
from rz.tools import (
    ToolCallStream, call_constraint, forced_function, functions_of, offered_functions, parse_tool_calls, with_call_constraint,
    with_tool_prompt,
)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n',
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',  # EOS before the close
    ],
    ids=["hermes", "hermes-lines", "mistral", "llama3-python-tag", "llama3-bare", "hermes-unclosed"],
)
def test_each_format_parses_into_one_call(text):
    content, calls = parse_tool_calls(text)
    assert content == ""
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("get_weather", {"city": "Paris", "unit": "celsius"})]
    assert calls[0].as_openai()["type"] == "function" and calls[0].id.startswith("call_")


def test_text_around_calls_is_the_content_and_plain_json_is_not_a_call():
    content, calls = parse_tool_calls('Let me check. <tool_call>{"name": "a", "arguments": {}}</tool_call>'
                                      '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>')
    assert content == "Let me check." and [c.name for c in calls] == ["a", "b"]
    assert parse_tool_calls('The answer is {"x": 1}') == ('The answer is {"x": 1}', [])
    assert parse_tool_calls('{"x": 1}') == ('{"x": 1}', [])


@pytest.mark.parametrize("cut", range(1, 40, 3))
def test_a_stream_passes_text_and_holds_back_calls_wherever_the_pieces_break(cut):
    text = 'Sure, one moment <tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    stream = ToolCallStream()
    sent = "".join(stream.feed(text[i : i + cut]) for i in range(0, len(text), cut))
    tail, calls = stream.finish()
    assert sent + tail == "Sure, one moment " and [c.name for c in calls] == ["get_time"]
    plain, text = ToolCallStream(), "a < b and {c} <tool"
    sent = "".join(plain.feed(text[i : i + cut]) for i in range(0, len(text), cut))
    assert sent + plain.finish()[0] == text


def test_arguments_written_as_json_text_are_an_object_and_anything_else_is_no_call():
    content, calls = parse_tool_calls('<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>')
    assert content == "" and json.loads(calls[0].arguments) == {"zone": "UTC"}
    assert calls[0].as_ollama() == {"function": {"name": "get_time", "arguments": {"zone": "UTC"}}}
    for text in ('<tool_call>{"name": "get_time", "arguments": "not json"}</tool_call>',
                 '<tool_call>{"name": "get_time", "arguments": [1, 2]}</tool_call>'):
        assert parse_tool_calls(text) == (text, [])


def test_offered_functions_and_the_call_constraint_they_force():
    functions = functions_of(TOOLS)
    assert offered_functions(None, None) == ([], []) and offered_functions(None, "none") == ([], [])
    assert offered_functions(TOOLS, "none") == ([], [])
    assert offered_functions(TOOLS, "auto") == (functions, [])
    assert offered_functions(TOOLS, "required") == (functions, functions)
    with pytest.raises(RequestError, match="tool_choice needs tools"):
        offered_functions(None, "required")
    assert with_call_constraint({"temperature": 0.5}, []) == {"temperature": 0.5}
    forced = with_call_constraint({"temperature": 0.5}, functions[:1])
    assert forced["temperature"] == 0.5 and forced["response_format"]["lark"] == call_constraint(functions[:1]).source
    with pytest.raises(RequestError, match="leave out response_format and grammar"):
        with_call_constraint({"grammar": 'root ::= "x"'}, functions[:1])


def test_tool_choice_and_malformed_tools():
    functions = functions_of(TOOLS)
    assert forced_function(None, functions) == (True, []) and forced_function("none", functions) == (False, [])
    assert forced_function("required", functions) == (True, functions)
    assert forced_function({"type": "function", "function": {"name": "get_time"}}, functions) == (True, functions[1:])
    with pytest.raises(RequestError, match="tool_choice"):
        forced_function({"type": "function", "function": {"name": "nope"}}, functions)
    with pytest.raises(RequestError, match="tools\\[0\\]"):
        functions_of([{"type": "function", "function": {"name": "bad name!"}}])


def test_a_template_without_tools_gets_them_in_the_system_message_with_past_calls_written_out():
    messages = with_tool_prompt(
        [
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
        ],
        functions_of(TOOLS),
    )
    assert messages[0]["role"] == "system" and '"get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    assert messages[3] == {"role": "user", "content": "<tool_response>\n-3 C\n</tool_response>"}


@pytest.fixture(scope="module")
def llm():
    return rz.LLM(smollm2_135m_path(), n_ctx=1024, max_batch=4)


@pytest.mark.slow
def test_a_required_call_always_parses_and_its_arguments_validate(llm):
    functions = functions_of(TOOLS)
    ids = llm.chat_prompt_ids([{"role": "user", "content": "What's the weather like in Paris?"}], functions=functions)
    assert "get_weather" in llm.detokenize(ids)
    for seed in range(3):
        completions = llm.generate([ids] * 2, max_tokens=80, temperature=1.0, seed=seed,
                                   response_format={"type": "lark", "lark": call_constraint(functions[:1]).source})
        for completion in completions:
            assert completion.finish_reason == FinishReason.STOP, completion.text
            content, calls = parse_tool_calls(completion.text)
            assert content == "" and [c.name for c in calls] == ["get_weather"]
            jsonschema.validate(json.loads(calls[0].arguments), WEATHER)


@pytest.mark.slow
def test_llm_chat_returns_the_calls_it_parsed_and_text_without_tools(llm):
    ask = [{"role": "user", "content": "What's the weather like in Paris?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        answer = llm.chat(ask, max_tokens=80, tools=TOOLS, tool_choice=choice, temperature=1.0, seed=4)
        assert answer.finish_reason == FinishReason.STOP and answer.text == ""
        (call,) = answer.tool_calls
        assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    plain = llm.chat(ask, max_tokens=6, temperature=0.0)
    assert plain.tool_calls is None
    declined = llm.chat(ask, max_tokens=6, temperature=0.0, tools=TOOLS, tool_choice="none")
    assert (declined.token_ids, declined.tool_calls) == (plain.token_ids, None)
    with pytest.raises(RequestError, match="leave out response_format"):
        llm.chat(ask, tools=TOOLS, tool_choice="required", response_format={"type": "json_object"})
    with pytest.raises(RequestError, match="tool_choice needs tools"):
        llm.chat(ask, tool_choice="required")


def _streamed(llm, ask, **options) -> tuple[str, list[dict] | None]:
    """chat_stream's text, and its calls (the list that may come last)."""
    items = list(llm.chat_stream(ask, **options))
    calls = items.pop() if items and isinstance(items[-1], list) else None
    assert all(isinstance(item, str) and item for item in items)
    return "".join(items), calls


def test_llm_chat_stream_holds_calls_back_and_yields_them_last_as_chat_returns_them(llm):
    ask = [{"role": "user", "content": "What's the weather like in Paris?"}]
    answer = llm.chat(ask, max_tokens=80, tools=TOOLS, tool_choice="required", temperature=1.0, seed=4)
    text, calls = _streamed(llm, ask, max_tokens=80, tools=TOOLS, tool_choice="required", temperature=1.0, seed=4)
    assert text == answer.text == ""
    assert [call["function"] for call in calls] == [call["function"] for call in answer.tool_calls]
    for tools in (TOOLS, None):  # free to answer in text: what chat() answers, piece by piece
        plain = llm.chat(ask, max_tokens=12, temperature=0.0, tools=tools)
        text, calls = _streamed(llm, ask, max_tokens=12, temperature=0.0, tools=tools)
        assert (text, calls) == (plain.text, plain.tool_calls or None)
    assert len(list(llm.chat_stream(ask, max_tokens=12, temperature=0.0))) > 1
