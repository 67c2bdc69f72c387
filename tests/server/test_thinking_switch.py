"""Qwen3's thinking switch (the chat template's enable_thinking) from each front: OpenAI HTTP's
chat_template_kwargs (as llama-server takes it), Ollama's think, and rz.v1's ChatRequest.enable_thinking."""

import asyncio

import pytest

from rz.api.v1 import inference_pb2 as pb
from rz.server import http_ollama, http_openai
from rz.server.http_common import HttpError
from rz.server.service import InferenceService


class RecordingLLM:
    """An LLM's chat_prompt_ids that records what it was given."""

    def __init__(self):
        self.calls = []

    def chat_prompt_ids(self, messages, enable_thinking=None, functions=None):
        self.calls.append((messages, enable_thinking))
        assert not functions
        return [1, 2, 3]


@pytest.mark.parametrize("kwargs, expected", [(None, None), ({}, None), ({"enable_thinking": False}, False), ({"enable_thinking": True}, True)])
def test_openai_chat_template_kwargs_give_enable_thinking(kwargs, expected):
    body = {"messages": []} | ({} if kwargs is None else {"chat_template_kwargs": kwargs})
    assert http_openai._enable_thinking(body) is expected


@pytest.mark.parametrize("kwargs, param", [({"reasoning_effort": "low"}, "chat_template_kwargs"), ({"enable_thinking": "no"}, "enable_thinking"), ("x", "chat_template_kwargs")])
def test_openai_chat_template_kwargs_rz_cannot_honour_are_a_400(kwargs, param):
    with pytest.raises(HttpError) as error:
        http_openai._enable_thinking({"chat_template_kwargs": kwargs})
    assert error.value.status == 400 and error.value.param == param


class ConnectedRequest:
    """A Starlette request whose client stays connected."""

    async def is_disconnected(self) -> bool:
        return False


@pytest.mark.parametrize("think", [None, True, False])
def test_ollama_think_reaches_the_chat_template(think):
    llm = RecordingLLM()
    messages = [{"role": "user", "content": "hi"}]
    assert asyncio.run(http_ollama._chat_ids(ConnectedRequest(), llm, messages, [], think)) == [1, 2, 3]
    assert llm.calls == [(messages, think)]


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_grpc_chat_request_enable_thinking_reaches_the_chat_template(enable_thinking):
    llm = RecordingLLM()
    service = InferenceService(metrics=None, max_request_bytes=1 << 20)
    service.attach(llm, None, None)
    request = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], enable_thinking=enable_thinking)
    assert service._chat_prompt_ids(request) == [1, 2, 3]
    assert llm.calls == [([{"role": "user", "content": "hi"}], enable_thinking)]
