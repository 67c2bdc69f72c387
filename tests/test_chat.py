"""Chat templates: the GGUF's Jinja rendered as llama-cpp-python renders it, the built-in fallbacks, the sandbox."""

import re
import resource
import time

import jinja2
import pytest

from rz.chat import CHATML_TEMPLATE, GEMMA_TEMPLATE, builtin_template, chat_template_problem, render_chat
from rz.errors import RequestError
from rz.gguf import GGUFFile
from rz.model_files import gemma3_270m_path, smollm2_135m_path
from rz.template_sandbox import TemplateRenderer

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "  Hi there!  "},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Caf\u00e9 <b>&</b>?"},
]


@pytest.fixture(scope="module")
def smollm2_metadata():
    with GGUFFile(smollm2_135m_path()) as gguf:
        tokens = gguf.require("tokenizer.ggml.tokens")
        return (
            gguf.require("tokenizer.chat_template"),
            tokens[gguf.require("tokenizer.ggml.bos_token_id")],
            tokens[gguf.require("tokenizer.ggml.eos_token_id")],
        )


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:2], CONVERSATION[1:]])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_renders_as_plain_jinja_does(smollm2_metadata, messages, add_generation_prompt):
    """llama-cpp-python's Jinja2ChatFormatter renders this way: same options, same variables."""
    template, bos, eos = smollm2_metadata
    plain = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    variables = dict(messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=add_generation_prompt)
    expected = plain.render(**variables)
    assert render_chat(template, messages, bos, eos, add_generation_prompt) == expected


def test_smollm2_template_exact_text(smollm2_metadata):
    template, bos, eos = smollm2_metadata
    prompt = render_chat(template, [{"role": "user", "content": "Hi"}], bos, eos)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_smollm2_template_matches_llama_cpp_python(smollm2_metadata):
    formatters = pytest.importorskip("llama_cpp.llama_chat_format")
    template, bos, eos = smollm2_metadata
    formatter = formatters.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
    expected = formatter(messages=CONVERSATION).prompt
    assert render_chat(template, CONVERSATION, bos, eos) == expected


# A Qwen3-style switch: the model opens its own <think> block, and the template closes an empty one
# when thinking is turned off.
THINKING_SWITCH_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_enable_thinking_reaches_the_template_as_llama_cpp_python_passes_it(enable_thinking):
    formatters = pytest.importorskip("llama_cpp.llama_chat_format")
    formatter = formatters.Jinja2ChatFormatter(template=THINKING_SWITCH_TEMPLATE, eos_token="</s>", bos_token="<s>")
    switch = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    expected = formatter(messages=CONVERSATION, **switch).prompt
    rendered = render_chat(THINKING_SWITCH_TEMPLATE, CONVERSATION, "<s>", "</s>", enable_thinking=enable_thinking)
    assert rendered == expected
    assert rendered.endswith("</think>\n\n") == (enable_thinking is False)


def test_enable_thinking_must_be_a_boolean():
    with pytest.raises(RequestError, match="enable_thinking"):
        render_chat(THINKING_SWITCH_TEMPLATE, CONVERSATION, "<s>", "</s>", enable_thinking="no")


def test_gemma_gguf_has_no_template_and_gets_gemma_turns():
    with GGUFFile(gemma3_270m_path()) as gguf:
        assert gguf.get("tokenizer.chat_template") is None
        architecture = gguf.require("general.architecture")
        tokens = set(gguf.require("tokenizer.ggml.tokens"))
    assert builtin_template(architecture) is GEMMA_TEMPLATE
    # Every marker the fallback writes is a single special token of Gemma's vocabulary.
    assert {"<bos>", "<start_of_turn>", "<end_of_turn>"} <= tokens


def test_gemma_fallback_format():
    prompt = render_chat(None, CONVERSATION, "<bos>", "<eos>", architecture="gemma3")
    assert prompt == (
        "<bos><start_of_turn>user\nYou are terse.\n\nHi there!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCaf\u00e9 <b>&</b>?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    without_prompt = render_chat(None, CONVERSATION[1:2], "<bos>", "<eos>", False, architecture="gemma3")
    assert without_prompt == "<bos><start_of_turn>user\nHi there!<end_of_turn>\n"


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "phi2", None])
def test_other_architectures_fall_back_to_chatml(architecture):
    assert builtin_template(architecture) is CHATML_TEMPLATE
    prompt = render_chat(None, CONVERSATION[:2], "<s>", "</s>", architecture=architecture)
    assert prompt == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\n  Hi there!  <|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_helpers_like_hugging_face():
    template = (
        "{% for message in messages %}"
        "{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ message | tojson }}"
        "{% endfor %}"
        "|{{ strftime_now('%Y') | length }}"
        "|{% for i in range(5) %}{% if i % 2 %}{% continue %}{% endif %}{{ i }}{% endfor %}"
    )
    prompt = render_chat(template, CONVERSATION[3:] + CONVERSATION[:1], "", "")
    assert prompt == '{"role": "user", "content": "Caf\u00e9 <b>&</b>?"}|4|024'


def test_trim_and_lstrip_blocks_as_hugging_face():
    template = "{% for message in messages %}\n  {% if true %}\n{{ message['content'] }}\n  {% endif %}\n{% endfor %}\n"
    assert render_chat(template, CONVERSATION[:2], "", "") == "You are terse.\n  Hi there!  \n"


def test_raise_exception_becomes_a_request_error():
    template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    )
    with pytest.raises(RequestError, match="Conversation must start with user"):
        render_chat(template, CONVERSATION, "", "")


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ joiner.__init__.__globals__['__builtins__'] }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ strftime_now.__globals__['datetime'] }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ open('/etc/passwd').read() }}",
        "{{ os.system('id') }}",
        "{% import 'os' as os %}{{ os }}",
        "{% include '/etc/passwd' %}",
        "{{ messages.append({'role': 'user', 'content': 'injected'}) }}{{ messages | length }}",
        "{{ messages[0].update({'content': 'x'}) }}{{ messages[0].content }}",
        "{{ messages[0].content.format.__self__ }}",
        "{{ (messages|attr('__class__')) }}",
    ],
)
def test_sandbox_keeps_templates_away_from_python(template):
    messages = [{"role": "user", "content": "hi"}]
    try:
        prompt = render_chat(template, messages, "", "")
    except RequestError:
        return
    # Rendering may succeed only by producing nothing of substance.
    for leak in ("class", "module", "function", "built-in", "root", "uid=", "injected", "<", "dict"):
        assert leak not in prompt, prompt
    assert messages == [{"role": "user", "content": "hi"}]


def test_template_syntax_error_is_a_request_error():
    with pytest.raises(RequestError, match="does not parse"):
        render_chat("{% for message in messages %}{{ message", CONVERSATION, "", "")


def test_template_runtime_error_is_a_request_error():
    with pytest.raises(RequestError, match="chat template failed"):
        render_chat("{{ messages[0]['content'] + 1 }}", CONVERSATION, "", "")


@pytest.mark.parametrize(
    "messages, problem",
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (None, "non-empty list"),
        (["hello"], r"messages\[0\]"),
        ([{"content": "hi"}], "role"),
        ([{"role": "", "content": "hi"}], "role"),
        ([{"role": 3, "content": "hi"}], "role"),
        ([{"role": "user"}], "content"),
        ([{"role": "user", "content": None}], "content"),
        ([{"role": "user", "content": 5}], "content"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "text"}]}], r"messages\[1\]"),
    ],
)
def test_malformed_messages_are_request_errors(messages, problem):
    with pytest.raises(RequestError, match=problem):
        render_chat(None, messages, "", "")


# Each amplifier the probes found (and a few more): the sandbox refuses it with the limit's name,
# and the server's process neither grows nor waits past the time limit.
@pytest.mark.parametrize(
    "template, limit",
    [
        ("{{ 'a' * 10**10 }}", "string multiplication"),
        ("{{ 'a' * 300000000 }}", "string multiplication"),
        ("{{ 'a' * 5000000 }}", "string multiplication"),
        ("{{ [0] * 10**9 }}", "list multiplication"),
        ("{% set s = namespace(v='ab') %}{% for i in range(60) %}{% set s.v = s.v + s.v %}{% endfor %}{{ s.v }}",
         "string concatenation"),
        ("{{ messages | tojson(indent=10**9) }}", "tojson indent"),
        ("{{ 7 ** 1000000000 }}", "power"),
        ("{% for i in range(10**6) %}x{% endfor %}", "range"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
             # Which comes first depends on the machine's load (the child runs at nice 19): either bounds it.
             "output limit|time limit"),
        ("{{ 'x' | center(10**10) }}", "memory limit"),
        ("{{ 'x'.ljust(10**9) }}", "memory limit"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "time limit"),
    ],
)
def test_template_resource_limits_are_request_errors_naming_the_limit(template, limit):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RequestError, match=limit):
        render_chat(template, [{"role": "user", "content": "hi"}], "", "")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 << 10  # KiB
    # The sandbox is usable again right after.
    assert render_chat(None, [{"role": "user", "content": "hi"}], "", "") == CHATML_TEMPLATE_HI


CHATML_TEMPLATE_HI = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_render_over_the_time_limit_is_stopped_not_abandoned():
    renderer = TemplateRenderer(time_limit=0.3)
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(RequestError, match="time limit"):
        renderer.render(endless, {})
    assert renderer._child is None  # killed, not left running
    assert renderer.render("{{ x }}", {"x": "ok"}) == "ok"
    renderer.close()


def test_renders_past_the_waiting_limit_are_refused_at_once_as_busy():
    import threading

    from rz.errors import TemplateBusyError

    renderer = TemplateRenderer(time_limit=2.0, waiting_limit=0)
    endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    running = threading.Thread(target=lambda: pytest.raises(RequestError, renderer.render, endless, {}))
    running.start()
    while not renderer._lock.locked():
        time.sleep(0.01)
    started = time.monotonic()
    with pytest.raises(TemplateBusyError, match="0 chat templates are already waiting"):
        renderer.render("{{ x }}", {"x": "ok"})
    assert time.monotonic() - started < 0.5
    running.join()
    assert renderer.render("{{ x }}", {"x": "ok"}) == "ok"
    renderer.close()


def test_templates_within_the_limits_render_in_full():
    text = render_chat("{{ 'ab' * 1000 }}{% for i in range(1000) %}{{ i % 10 }}{% endfor %}{{ 2 ** 100 }}", [{"role": "user", "content": "hi"}], "", "")
    assert text == "ab" * 1000 + "0123456789" * 100 + str(2**100)


@pytest.mark.parametrize(
    "template, problem",
    [
        ("{% for %}", "does not parse"),
        ("{{ 'a' * 10**10 }}", "string multiplication"),
        ("{{ raise_exception('needs a system message') }}", "needs a system"),
    ],
)
def test_a_template_that_cannot_render_one_message_is_a_request_error_and_a_problem_at_load(template, problem):
    with pytest.raises(RequestError, match=problem):
        render_chat(template, [{"role": "user", "content": "Hello"}], "<s>", "</s>")
    assert re.search(problem, chat_template_problem(template, "<s>", "</s>"))


def test_templates_that_render_some_minimal_chat_have_no_problem_at_load(smollm2_metadata):
    needs_system_first = (
        "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}"
        "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    )
    assert chat_template_problem(None, "<s>", "</s>") is None  # the built-in template
    assert chat_template_problem(*smollm2_metadata) is None
    assert chat_template_problem(needs_system_first, "<s>", "</s>") is None


def test_messages_with_values_json_cannot_carry_are_request_errors():
    from datetime import date

    with pytest.raises(RequestError, match="JSON values"):
        render_chat(None, [{"role": "user", "content": "hi", "when": date(2026, 1, 1)}], "", "")
