"""The HTTP API end to end: the official `openai` and `ollama` clients and raw HTTP against the
shared SmolLM2 server's HTTP port, plus the edges that need no model (a server that has not
loaded one answers HTTP already)."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import grpc
import jsonschema
import numpy as np
import ollama
import openai
import pytest

from rz.kv_cache import BLOCK_SIZE
from rz.server.server import ServerStartError
from server_process import wait_for
from test_hardening import started  # noqa: F401 - a fixture
from test_server import _metric

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


# More than one block of the KV cache (64 positions): prefix reuse maps whole blocks.
LONG_PROMPT = "The river Severn turned the mills of the valley one after another, and the millers sold their flour in town. " * 5


def full_blocks(n_prompt: int) -> int:
    """The positions of the full blocks before a prompt's last token: what a repeated prompt maps."""
    return (n_prompt - 1) // BLOCK_SIZE * BLOCK_SIZE


def _post(url: str, body, headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


# ----- no model: the front answers while the model loads -----


def test_while_loading_health_is_503_and_requests_get_openai_and_ollama_errors(started):
    url = f"http://127.0.0.1:{started(http_port=0).http_port}"
    status, body = _get(f"{url}/health")
    assert (status, json.loads(body)) == (503, {"status": "loading"})
    status, body = _get(f"{url}/v1/models")
    assert status == 503 and "loading" in json.loads(body)["error"]["message"]
    status, body = _get(f"{url}/api/tags")
    assert status == 503 and "loading" in json.loads(body)["error"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as refused:
        client.models.list()
    assert refused.value.status_code == 503


def test_malformed_wrong_and_oversize_bodies(started):
    url = f"http://127.0.0.1:{started(http_port=0, max_request_bytes=1000).http_port}"
    for path in ("/v1/completions", "/v1/chat/completions", "/api/generate", "/tokenize"):
        status, body = _post(f"{url}{path}", b"{not json")
        assert status == 400 and "not valid JSON" in body.decode(), path
        status, body = _post(f"{url}{path}", [1, 2])
        assert status == 400 and "JSON object" in body.decode(), path
        status, body = _post(f"{url}{path}", {"prompt": "x" * 2000})
        assert status == 413 and "--max-request-bytes" in body.decode(), path
    status, body = _post(f"{url}/v1/nothing", {})
    assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error"


def test_the_api_key_is_a_bearer_token_on_http_and_health_stays_open(started):
    url = f"http://127.0.0.1:{started(http_port=0, api_key='s3cret').http_port}"
    assert _get(f"{url}/health")[0] == 503  # open, and loading
    for headers in ({}, {"authorization": "Bearer wrong"}):
        status, body = _get(f"{url}/v1/models", headers)
        assert status == 401 and "Bearer" in json.loads(body)["error"]["message"]
        status, body = _post(f"{url}/api/generate", {"prompt": "hi"}, headers)
        assert status == 401 and "Bearer" in json.loads(body)["error"]
    assert _get(f"{url}/metrics")[0] == 401
    assert _get(f"{url}/v1/models", {"authorization": "Bearer s3cret"})[0] == 503  # past the key: not loaded
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()


def test_a_taken_http_port_is_a_clean_error(started):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServerStartError, match="cannot serve HTTP.*--http-port"):
            started(http_port=taken.getsockname()[1])


def test_a_long_text_whose_http_client_left_is_dropped_with_499(started):
    from types import SimpleNamespace

    from rz.errors import CallerGoneError
    from rz.gguf import GGUFFile
    from rz.model_files import smollm2_135m_path
    from rz.server.http_common import http_status
    from rz.tokenizer import Tokenizer
    from rz.tokenizer.long_texts import LONG_TEXT_CHARS

    assert http_status(CallerGoneError("the caller left"), "POST /tokenize") == 499
    tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(smollm2_135m_path()).metadata)
    server = started(http_port=0, max_request_bytes=16 << 20)
    server.http.attach(SimpleNamespace(tokenize=tokenizer.encode), SimpleNamespace(), "m")
    url = f"http://127.0.0.1:{server.http_port}"

    def cancelled() -> float:
        return server.metrics.registry.get_sample_value("rz_requests_total", {"method": "POST /tokenize", "status": "CANCELLED"}) or 0

    data = json.dumps({"content": "a" * (8 << 20)}).encode()  # one word: tens of seconds of merging
    with socket.create_connection(("127.0.0.1", server.http_port)) as connection:
        connection.sendall(f"POST /tokenize HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           f"content-length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(1.0)
    wait_for(lambda: cancelled() == 1, timeout=15)
    # Had the 8 MB text kept the tokenizer's turn, this one would wait for it past its timeout.
    text = "ab" * (LONG_TEXT_CHARS // 2 + 1)
    status, body = _post(f"{url}/tokenize", {"content": text}, timeout=15)
    assert status == 200 and json.loads(body)["tokens"] == tokenizer.encode_here(text, add_bos=False, special=True)


# ----- the shared SmolLM2 server -----


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.slow
def test_openai_chat_equals_llm_chat_streamed_or_not(client, llm):
    expected = llm.chat(MESSAGES, max_tokens=8, temperature=0.0)
    reply = client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=8, temperature=0)
    n_answer = len(expected.token_ids)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason.value  # the answer may end before 8 tokens
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.usage["prompt_tokens"], n_answer)
    chunks = list(client.chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    ))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n_answer
    # The second request of the same prompt maps what the first left cached: all but its last token.
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == expected.usage["prompt_tokens"] - 1


@pytest.mark.slow
def test_openai_completions_logprobs_and_stop_equal_llm_generate(client, llm):
    prompt = "The capital of France is"
    expected = llm.generate(prompt, max_tokens=6, temperature=0.0, logprobs=2, stop=["\n\n"])
    reply = client.completions.create(model="any", prompt=prompt, max_tokens=6, temperature=0, logprobs=2, stop=["\n\n"])
    choice = reply.choices[0]
    assert choice.text == expected.text
    assert choice.logprobs.token_logprobs == pytest.approx([e["logprob"] for e in expected.logprobs], abs=1e-4)
    assert [len(top) for top in choice.logprobs.top_logprobs] == [2] * len(expected.logprobs)
    streamed = client.completions.create(model="any", prompt=prompt, max_tokens=6, temperature=0, stop=["\n\n"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected.text


@pytest.mark.slow
def test_openai_chat_logprobs_in_openais_format(client, llm):
    ids = llm.chat_prompt_ids(MESSAGES)
    expected = llm.generate(ids, max_tokens=4, temperature=0.0, logprobs=3)
    reply = client.chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == pytest.approx([e["logprob"] for e in expected.logprobs], abs=1e-4)
    for entry, want in zip(content, expected.logprobs):
        assert bytes(entry.bytes) == llm.tokenizer.token_to_piece(want["token"])
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx([lp for _, lp in want["top"]], abs=1e-4)


@pytest.mark.slow
def test_openai_n_choices_with_a_seed(client):
    reply = client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=5, n=2, seed=7, temperature=1.0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert 2 <= reply.usage.completion_tokens <= 10  # two choices of 1 to 5 tokens each
    again = client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=5, n=2, seed=7, temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]
    chunks = [c.choices[0] for c in client.chat.completions.create(
        model="any", messages=MESSAGES, max_tokens=5, n=2, seed=7, temperature=1.0, stream=True
    )]
    assert ["".join(c.delta.content or "" for c in chunks if c.index == i) for i in (0, 1)] == [c.message.content for c in reply.choices]


@pytest.mark.slow
def test_openai_n_choices_share_one_prefill_of_the_prompt(client, server):
    """The second choice maps what the first has just prefilled, all but the prompt's last token,
    and computes only that."""
    before = server.metrics()
    reply = client.completions.create(
        model="any", prompt=LONG_PROMPT + " Mills that the river Severn turned, in order:", max_tokens=3, n=2, seed=3, temperature=1.0
    )
    after = server.metrics()

    def delta(name):
        return _metric(after, name) - _metric(before, name)

    computed = delta("rz_prompt_tokens_total") - delta("rz_prompt_tokens_cached_total")
    n_prompt = reply.usage.prompt_tokens
    # The fewest of the choices, the first's: at most its BOS token, copied from an earlier prompt's first block.
    first_cached = reply.usage.prompt_tokens_details.cached_tokens
    assert first_cached <= 1
    # The second maps the first's full blocks and copies the rest but the last token (rz.kv_blocks).
    assert computed == n_prompt - first_cached + 1 and full_blocks(n_prompt) > 0
    assert 0 < _metric(after, "rz_prompt_cache_hit_ratio") < 1


@pytest.mark.slow
def test_openai_cache_prompt_false_prefills_the_whole_prompt(client):
    prompt = LONG_PROMPT + " Herons stand in the shallows for hours,"
    client.completions.create(model="any", prompt=prompt, max_tokens=1, temperature=0)
    cached = client.completions.create(model="any", prompt=prompt, max_tokens=1, temperature=0)
    assert cached.usage.prompt_tokens_details.cached_tokens == cached.usage.prompt_tokens - 1
    opted_out = client.completions.create(model="any", prompt=prompt, max_tokens=1, temperature=0, extra_body={"cache_prompt": False})
    assert opted_out.usage.prompt_tokens_details.cached_tokens == 0


@pytest.mark.slow
def test_openai_errors_map_to_the_sdks_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="any", messages=MESSAGES, temperature=-1)
    with pytest.raises(openai.BadRequestError, match=r"logit_bias of token 1 must be in \[-100, 100\]"):
        client.completions.create(model="any", prompt="hi", logit_bias={"1": 101})
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="any", messages=[{"role": "wizard", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="context size"):
        client.completions.create(model="any", prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert client.models.list().data[0].id == client.models.retrieve(client.models.list().data[0].id).id


# Bounded so that any output it allows fits in the tests' 60 tokens: at most 20 letters (no escapes,
# one token or fewer each) and 9 digits. Unbounded, a model sampled at temperature 1 can run out of
# tokens inside a long number or name, which is a correct 'length' finish but not a test of the schema.
CITY = {
    "type": "object",
    "properties": {"name": {"type": "string", "pattern": "^[A-Za-z ]{1,20}$"},
                   "population": {"type": "integer", "minimum": 0, "maximum": 999_999_999}},
    "required": ["name", "population"],
    "additionalProperties": False,
}


def _clear_runner_up(llm, prompt_ids) -> tuple[list[int], int]:
    """(banned, expected): the likeliest next tokens down to the first that leads the one after it
    by more than rounding moves, and that token, which wins once the others are banned."""
    logits = llm.score(prompt_ids)[-1]
    order = np.argsort(-logits).tolist()
    clear = next(i for i in range(1, 6) if logits[order[i]] - logits[order[i + 1]] > 0.25)
    return order[:clear], order[clear]


@pytest.mark.slow
def test_logit_bias_over_openai_llama_server_pairs_and_grpc(server, client, llm):
    prompt = "The capital of France is"
    banned, second = _clear_runner_up(llm, llm.tokenize(prompt))
    expected = llm.generate(prompt, max_tokens=1, temperature=0.0, logit_bias={token: -100 for token in banned})
    assert expected.token_ids == [second]
    reply = client.completions.create(model="any", prompt=prompt, max_tokens=1, temperature=0,
                                      logit_bias={str(token): -100 for token in banned})
    assert reply.choices[0].text == expected.text
    # llama-server's list of pairs, with false banning the token.
    status, body = _post(f"{server.http_url}/v1/completions",
                         {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logit_bias": [[token, False] for token in banned]})
    assert status == 200 and json.loads(body)["choices"][0]["text"] == expected.text
    with server.client() as grpc_client:  # rz.v1's GenerationOptions.logit_bias
        assert grpc_client.generate(prompt, 1, temperature=0.0, logit_bias={token: -100 for token in banned}).token_ids == [second]

    chat_banned, chat_second = _clear_runner_up(llm, llm.chat_prompt_ids(MESSAGES))
    answer = client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=1, temperature=0,
                                            logit_bias={str(token): -100 for token in chat_banned})
    assert answer.choices[0].message.content == llm.detokenize([chat_second])
    favoured = int(np.argsort(-llm.score(llm.tokenize(prompt))[-1])[50])  # one greedy decoding would not choose
    forced = client.completions.create(model="any", prompt=prompt, max_tokens=3, temperature=0, logit_bias={str(favoured): 100},
                                       extra_body={"ignore_eos": True})
    assert forced.choices[0].text == llm.generate(prompt, max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias={favoured: 100}).text


@pytest.mark.slow
@pytest.mark.parametrize("logit_bias, message", [
    ({"1": "up"}, "logit_bias of token 1 must be a number"),
    ({"one": 1}, "logit_bias keys must be token ids"),
    ({str(i): 1 for i in range(301)}, "logit_bias may bias at most 300 tokens, got 301"),
    ({"-1": 1}, "logit_bias keys must be token ids"),
    ({"1": -100.5}, r"logit_bias of token 1 must be in \[-100, 100\]"),
    ({"1000000": 1}, r"logit_bias token ids \[1000000\] are outside the vocabulary"),
    ([[1, 2, 3]], "logit_bias must map token ids to biases"),
    ("1:5", "'logit_bias' must be an object or an array"),
])
def test_a_bad_logit_bias_is_a_400_naming_the_problem(client, logit_bias, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.completions.create(model="any", prompt="hi", max_tokens=1, logit_bias=logit_bias)


@pytest.mark.slow
def test_a_bad_logit_bias_is_invalid_argument_over_grpc(server, llm):
    for logit_bias, message in (({1: 200.0}, "logit_bias of token 1 must be in"), ({llm.config.n_vocab: 1.0}, "outside the vocabulary")):
        with server.client() as grpc_client, pytest.raises(grpc.RpcError) as refused:
            grpc_client.generate("hi", 1, logit_bias=logit_bias)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in refused.value.details()


@pytest.mark.slow
def test_structured_output_over_openai_llama_server_ollama_and_grpc_validates(server, client):
    ask = [{"role": "user", "content": "Describe a city."}]
    response_format = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    reply = client.chat.completions.create(model="any", messages=ask, max_tokens=60, n=2, seed=5, temperature=1.0,
                                           response_format=response_format)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), CITY)
    chunks = client.chat.completions.create(model="any", messages=ask, max_tokens=60, seed=6, temperature=1.0,
                                            response_format=response_format, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), CITY)
    reply = client.completions.create(model="any", prompt="Is water wet?", max_tokens=5, extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert reply.choices[0].text in ("yes", "no")
    ollama_client = ollama.Client(host=server.http_url)
    answer = ollama_client.chat(model="smollm2", messages=ask, format=CITY, options={"num_predict": 60, "seed": 7})
    jsonschema.validate(json.loads(answer.message.content), CITY)
    generated = ollama_client.generate(
        model="smollm2", prompt="Reply with a small JSON object giving the name and country of one city.", format="json",
        options={"num_predict": 100, "temperature": 0.7, "seed": 3, "repeat_penalty": 1.1},
    )
    assert generated.done_reason == "stop" and isinstance(json.loads(generated.response), dict)
    with server.client() as grpc_client:  # rz.v1's GenerationOptions.response_format
        completion = grpc_client.generate("A city, as JSON:", 60, seed=8, temperature=1.0, response_format=response_format)
    assert completion.finish_reason == "stop"
    jsonschema.validate(json.loads(completion.text), CITY)


@pytest.mark.slow
def test_a_malformed_schema_or_grammar_is_a_400_or_invalid_argument(server, client):
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model="any", messages=MESSAGES, max_tokens=5,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})
    with pytest.raises(openai.BadRequestError, match="gbnf"):
        client.completions.create(model="any", prompt="hi", max_tokens=5, extra_body={"grammar": "root ::= missing"})
    status, body = _post(f"{server.http_url}/api/generate", {"prompt": "hi", "format": "yaml"})
    assert status == 400 and "format" in json.loads(body)["error"]
    with server.client() as grpc_client, pytest.raises(grpc.RpcError) as refused:
        grpc_client.generate("hi", 5, grammar="root ::= missing")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "gbnf" in refused.value.details()


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"], "additionalProperties": False,
}}}


@pytest.mark.slow
def test_tool_calls_with_tool_choice_required_or_named_validate_and_stream_as_deltas(client):
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    parameters = WEATHER_TOOL["function"]["parameters"]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        reply = client.chat.completions.create(model="any", messages=ask, tools=[WEATHER_TOOL], tool_choice=choice,
                                               max_tokens=40, seed=1, temperature=0.8)
        assert reply.choices[0].finish_reason == "tool_calls"
        (call,) = reply.choices[0].message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id
        jsonschema.validate(json.loads(call.function.arguments), parameters)
    chunks = list(client.chat.completions.create(model="any", messages=ask, tools=[WEATHER_TOOL], tool_choice="required",
                                                 max_tokens=40, seed=2, stream=True))
    deltas = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or []]
    assert [d.function.name for d in deltas] == ["get_weather"] and deltas[0].index == 0
    jsonschema.validate(json.loads(deltas[0].function.arguments), parameters)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == ""
    plain = client.chat.completions.create(model="any", messages=ask, tools=[WEATHER_TOOL], tool_choice="none",
                                           max_tokens=8, temperature=0)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="any", messages=ask, tools=[WEATHER_TOOL],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


@pytest.mark.slow
def test_grpc_chat_with_a_required_tool_gets_its_calls_in_the_last_message(server):
    parameters = WEATHER_TOOL["function"]["parameters"]
    with server.client() as grpc_client:
        answer = grpc_client.chat([{"role": "user", "content": "Weather in Rome?"}], 40, tools=[WEATHER_TOOL],
                                  tool_choice="get_weather", seed=3)
        (call,) = answer.tool_calls
        assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)
        with pytest.raises(grpc.RpcError) as refused:
            grpc_client.chat([{"role": "user", "content": "hi"}], 5, tools=[WEATHER_TOOL], tool_choice="nope")
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tool_choice" in refused.value.details()
        with pytest.raises(grpc.RpcError) as refused:
            grpc_client.chat([{"role": "user", "content": "hi"}], 5, tools=[WEATHER_TOOL], tool_choice="required",
                             response_format={"type": "json_object"})
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "leave out response_format" in refused.value.details()


@pytest.mark.slow
def test_ollama_chat_with_tools_returns_message_tool_calls_as_ollama_does(server):
    client = ollama.Client(host=server.http_url)
    parameters = WEATHER_TOOL["function"]["parameters"]
    # Ollama has no tool_choice: a format that holds the answer to a bare JSON call (Llama 3's form) makes one certain.
    call = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    reply = client.chat(model="smollm2", messages=ask, tools=[WEATHER_TOOL], format=call, options={"num_predict": 60, "seed": 5})
    assert reply.done_reason == "stop" and reply.message.content == ""
    (made,) = reply.message.tool_calls
    assert made.function.name == "get_weather"
    jsonschema.validate(dict(made.function.arguments), parameters)
    parts = list(client.chat(model="smollm2", messages=ask, tools=[WEATHER_TOOL], format=call, stream=True,
                             options={"num_predict": 60, "seed": 6}))
    streamed = [c for part in parts for c in part.message.tool_calls or []]
    assert [c.function.name for c in streamed] == ["get_weather"] and not parts[-1].message.tool_calls
    assert parts[-1].done and not parts[-2].done and parts[-2].message.tool_calls
    assert "".join(part.message.content for part in parts) == ""
    jsonschema.validate(dict(streamed[0].function.arguments), parameters)
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(model="smollm2", messages=ask, tools=[{"type": "function", "function": {"name": "bad name!"}}])
    assert refused.value.status_code == 400 and "tools[0]" in refused.value.error


@pytest.mark.slow
def test_ollama_chat_takes_past_calls_and_tool_results_into_the_prompt(server, llm):
    from rz.tools import functions_of

    arguments = {"city": "Paris"}
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"},
    ]
    status, body = _post(f"{server.http_url}/api/chat", {"messages": history, "tools": [WEATHER_TOOL], "stream": False,
                                                         "options": {"num_predict": 1}})
    assert status == 200, body
    as_openai = history[:1] + [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "content": "18 C, sunny"},
    ]
    assert json.loads(body)["prompt_eval_count"] == len(llm.chat_prompt_ids(as_openai, functions=functions_of([WEATHER_TOOL])))
    bad = history[:1] + [{"role": "assistant", "content": "", "tool_calls": [{"function": {"arguments": {}}}]}]
    status, body = _post(f"{server.http_url}/api/chat", {"messages": bad, "stream": False})
    assert status == 400 and "tool_calls" in json.loads(body)["error"]


@pytest.mark.slow
def test_sse_framing_done_and_usage_chunk(server):
    status, body = _post(f"{server.http_url}/v1/completions", {
        "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True},
    })
    assert status == 200
    events = body.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") for event in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 4
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_ollama_ndjson_and_durations(server):
    status, body = _post(f"{server.http_url}/api/generate", {"model": "m", "prompt": LONG_PROMPT, "options": {"num_predict": 3}})
    assert status == 200
    lines = [json.loads(line) for line in body.decode().splitlines()]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    final = lines[-1]
    assert final["done_reason"] == "length" and final["eval_count"] == 3
    assert final["total_duration"] >= final["prompt_eval_duration"] > 0 and final["eval_duration"] > 0
    # Asked again, all but the prompt's last token are in the KV cache.
    status, body = _post(f"{server.http_url}/api/generate", {"model": "m", "prompt": LONG_PROMPT, "options": {"num_predict": 3}})
    again = json.loads(body.decode().splitlines()[-1])
    assert again["prompt_eval_count"] == final["prompt_eval_count"]
    assert again["prompt_eval_cached_count"] == final["prompt_eval_count"] - 1


@pytest.mark.slow
def test_ollama_client_generate_and_chat(server, llm):
    client = ollama.Client(host=server.http_url)
    expected = llm.chat(MESSAGES, max_tokens=6, temperature=0.0)
    options = {"num_predict": 6, "temperature": 0}
    reply = client.chat(model="smollm2", messages=MESSAGES, options=options)
    assert reply.message.content == expected.text and reply.done_reason == "length"
    streamed = "".join(part.message.content for part in client.chat(model="smollm2", messages=MESSAGES, options=options, stream=True))
    assert streamed == expected.text
    generated = client.generate(model="smollm2", prompt=MESSAGES[0]["content"], options=options)
    assert generated.response == expected.text and generated.eval_count == 6
    assert client.list().models[0].model
    assert client.show("smollm2").modelinfo["general.architecture"] == llm.config.architecture
    with pytest.raises(ollama.ResponseError) as refused:
        client.generate(model="smollm2", prompt="hi", options={"num_ctx": 10**6})
    assert refused.value.status_code == 400 and "num_ctx" in refused.value.error


@pytest.mark.slow
def test_http_and_grpc_streams_together_share_the_loop(server, llm, client):
    prompts = ["Once upon a time", "The three primary colors are", "Water boils at", "Roses are red,"]
    expected = [llm.generate(p, max_tokens=6, temperature=0.0).text for p in prompts]
    results = {}

    def over_http(i):
        stream = client.completions.create(model="any", prompt=prompts[i], max_tokens=6, temperature=0, stream=True)
        results[i] = "".join(c.choices[0].text for c in stream)

    def over_grpc(i):
        with server.client() as grpc_client:
            results[i] = "".join(chunk.text for chunk in grpc_client.stream(prompts[i], 6, temperature=0.0))

    threads = [threading.Thread(target=over_http if i % 2 else over_grpc, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [results.get(i) for i in range(len(prompts))] == expected


@pytest.mark.slow
def test_a_client_leaving_a_stream_frees_its_slot(server):
    before = server.metrics().get(("rz_requests_total", (("method", "POST /v1/completions"), ("status", "CANCELLED"))), 0)
    request = urllib.request.Request(
        f"{server.http_url}/v1/completions",
        data=json.dumps({"prompt": "Tell me a story", "max_tokens": 200, "ignore_eos": True, "stream": True}).encode(),
        headers={"content-type": "application/json"},
    )
    response = urllib.request.urlopen(request, timeout=60)
    response.readline()  # the first event: the request holds a slot
    response.close()
    key = ("rz_requests_total", (("method", "POST /v1/completions"), ("status", "CANCELLED")))
    wait_for(lambda: server.metrics().get(key, 0) == before + 1)
    wait_for(lambda: server.metrics()[("rz_active_slots", ())] == 0)


@pytest.mark.slow
@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "Tell me a story", "max_tokens": 200, "ignore_eos": True}),
    # Ollama has no ignore_eos: a schema that needs a long string keeps the answer going.
    ("/api/generate", {"prompt": "Tell me a story", "stream": False, "options": {"num_predict": 200},
                       "format": {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]}}),
])
def test_a_client_leaving_before_a_whole_answer_frees_its_slot(server, path, body):
    method = f"POST {path}"
    key = ("rz_requests_total", (("method", method), ("status", "CANCELLED")))
    before = server.metrics().get(key, 0)
    with socket.create_connection(("127.0.0.1", int(server.http_url.rsplit(":", 1)[1]))) as connection:
        data = json.dumps(body).encode()
        connection.sendall(f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                           f"content-length: {len(data)}\r\n\r\n".encode() + data)
        wait_for(lambda: server.metrics()[("rz_active_slots", ())] == 1)
    wait_for(lambda: server.metrics().get(key, 0) == before + 1)
    wait_for(lambda: server.metrics()[("rz_active_slots", ())] == 0)


@pytest.mark.slow
def test_bad_requests_are_400_and_the_server_goes_on(server):
    url = server.http_url
    bad = [
        ("/v1/chat/completions", {"messages": "hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}),
        ("/v1/completions", {"prompt": "hi", "n": 0}),
        ("/v1/completions", {"prompt": "hi", "stop": [1]}),
        ("/v1/completions", {"prompt": "hi", "top_p": True}),
        ("/api/chat", {"messages": [{"role": "wizard", "content": "hi"}]}),
        ("/api/generate", {"prompt": "hi", "options": {"temperature": "warm"}}),
        ("/detokenize", {"tokens": [10**9]}),
    ]
    for path, body in bad:
        status, answer = _post(f"{url}{path}", body)
        assert status == 400, (path, body, answer)
        error = json.loads(answer)["error"]
        assert error if path.startswith("/api/") else error["type"] == "invalid_request_error"
    status, answer = _post(f"{url}/tokenize", {"content": "hello world"})
    assert status == 200
    assert json.loads(_post(f"{url}/detokenize", json.loads(answer))[1])["content"] == "hello world"
    assert _get(f"{url}/health") == (200, b'{"status":"ok"}')
    status, scrape = _get(f"{url}/metrics")  # the same registry as the metrics port
    assert status == 200 and b'rz_requests_total{method="POST /v1/completions",status="INVALID_ARGUMENT"}' in scrape


def test_a_stream_failing_midway_ends_with_an_error_event():
    from types import SimpleNamespace

    import anyio

    from rz.generation import StepEvent
    from rz.server.http_openai import _Reply, _sse
    from rz.server.scheduler import EngineFailure

    async def events():
        yield 0, StepEvent(sequence=None, token_id=1, text="Hello", finish_reason=None)
        raise EngineFailure("decode step failed: the device is gone")

    async def collect():
        reply = _Reply(SimpleNamespace(llm=SimpleNamespace(tokenizer=None), model_name="m"), chat=False, n_logprobs=None)
        return [chunk async for chunk in _sse(reply, events(), [None], True, "POST /v1/completions")]

    chunks = [chunk.decode() for chunk in anyio.run(collect)]
    assert json.loads(chunks[0].removeprefix("data: "))["choices"][0]["text"] == "Hello"
    error = json.loads(chunks[-1].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "device is gone" in error["message"]
    assert all(chunk.startswith("data: ") and chunk.endswith("\n\n") for chunk in chunks)
    assert "[DONE]" not in "".join(chunks)
