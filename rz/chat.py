"""Chat messages to a prompt string, through the GGUF's own Jinja chat template, in a sandbox.

A template is code that comes with an untrusted model file, so it runs in Jinja's
ImmutableSandboxedEnvironment: no attribute starting with an underscore, no mutation of the
messages, no Python objects beyond the data it is handed, no files, no network. The environment
offers what Hugging Face's `apply_chat_template` and llama.cpp's minja offer templates:
trim_blocks and lstrip_blocks, loop controls (break/continue), `raise_exception`,
`strftime_now`, and a `tojson` that leaves non-ASCII text and HTML characters alone.

The rendered prompt carries its own special tokens (BOS included when the template writes
`bos_token`), so the engine tokenizes it with special tokens parsed and adds no BOS of its own,
as llama-cpp-python does for Jinja chat formats.

When the GGUF has no template, the fallback is chosen by architecture as llama.cpp users would
expect: Gemma's turn format for Gemma models, ChatML for everything else (llama.cpp's default).
"""

import functools
import json
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rz.errors import RequestError

# llama.cpp's built-in "chatml" template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma's turn format, as Google's Gemma 3 template writes it: BOS first, "assistant" called
# "model", each turn's content trimmed, and system text (Gemma has no system role) put in front
# of the next user turn, followed by a blank line.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set pending = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% set pending.system = pending.system + message['content'] + '\\n\\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{% if role != 'model' %}{{ pending.system }}{% set pending.system = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def builtin_template(architecture: str | None) -> str:
    """The template used when a GGUF carries none: Gemma's for Gemma models, else ChatML."""
    if architecture is not None and architecture.startswith("gemma"):
        return GEMMA_TEMPLATE
    return CHATML_TEMPLATE


def render_chat(
    template: str | None,
    messages: list[dict],
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
    architecture: str | None = None,
) -> str:
    """Render messages ([{"role": str, "content": str, ...}]) with the GGUF's template, or the built-in one."""
    _check_messages(messages)
    compiled = _compile(template if template is not None else builtin_template(architecture))
    try:
        return compiled.render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as error:
        # The template is untrusted input: whatever fails inside it (a raise_exception, a
        # sandbox refusal, a type error in its expressions) is a problem with this request
        # against this model, never an rz bug to propagate as such.
        raise RequestError(f"the chat template failed: {_describe(error)}") from error


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{index}] must be an object with 'role' and 'content', got {message!r}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError(f"messages[{index}] needs a non-empty string 'role', got {role!r}")
        content = message.get("content")
        if not isinstance(content, str):
            raise RequestError(f"messages[{index}] needs a string 'content', got {content!r}")


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    try:
        return _ENVIRONMENT.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise RequestError(f"the chat template does not parse: {_describe(error)}") from error


def _describe(error: Exception) -> str:
    line = f" (template line {error.lineno})" if isinstance(error, jinja2.TemplateSyntaxError) else ""
    return f"{type(error).__name__}: {error}{line}"


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; chat templates want the plain JSON
    # that Hugging Face and llama.cpp produce.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


_ENVIRONMENT = _make_environment()


def chat_loop(system: str | None, reply) -> int:
    """The terminal chat of `python -m rz chat` and `python -m rz client chat`: read a line, show
    the answer as it streams, keep the conversation. reply(messages) yields text pieces."""
    import sys

    messages = [{"role": "system", "content": system}] if system else []
    print("chat with the model; an empty line or Ctrl-D ends the conversation", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return 0
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line})
        pieces = []
        for piece in reply(messages):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(pieces)})
