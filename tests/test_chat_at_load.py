"""A model whose chat template cannot render even a one-message chat: found when rz.LLM loads it,
reported by chat() and `rz chat` before any conversation, and no obstacle to plain completions."""

import dataclasses

import pytest

import rz
import rz.llm
from rz.cli import main
from rz.errors import ChatTemplateError
from rz.model_files import smollm2_135m_path

BROKEN_TEMPLATE = "{{ 'a' * 10**10 }}"


@pytest.fixture
def broken_template(monkeypatch):
    """SmolLM2, read as if its GGUF carried BROKEN_TEMPLATE."""
    read_config = rz.llm.ModelConfig.from_gguf

    def with_broken_template(gguf):
        return dataclasses.replace(read_config(gguf), chat_template=BROKEN_TEMPLATE)

    monkeypatch.setattr(rz.llm.ModelConfig, "from_gguf", with_broken_template)


def test_rz_llm_loads_completes_text_and_chat_says_what_is_wrong_with_the_template(broken_template):
    llm = rz.LLM(smollm2_135m_path(), n_ctx=64, max_batch=1)
    assert "string multiplication" in llm.chat_template_problem
    with pytest.raises(ChatTemplateError, match="cannot render even a one-message chat.*string multiplication"):
        llm.chat([{"role": "user", "content": "Hello"}], max_tokens=2)
    assert len(llm.generate("Hello", max_tokens=2, temperature=0.0).token_ids) == 2


def test_rz_chat_stops_before_the_first_message(broken_template, monkeypatch, capsys):
    def no_input(prompt=""):
        raise AssertionError("rz chat asked for a message with a chat template that cannot work")

    monkeypatch.setattr("builtins.input", no_input)
    assert main(["chat", "--model", str(smollm2_135m_path()), "--n-ctx", "64"]) == 2
    error = capsys.readouterr().err
    assert "chat template cannot render even a one-message chat" in error and "string multiplication" in error


def test_a_working_template_has_no_problem():
    assert rz.LLM(smollm2_135m_path(), n_ctx=64, max_batch=1).chat_template_problem is None
