"""Chat messages to a prompt string, through the GGUF's own Jinja chat template, in a sandbox.

A template is code that comes with an untrusted model file, so it runs in Jinja's
ImmutableSandboxedEnvironment, in a child process with limits on output, time and memory
(rz.template_sandbox): no attribute starting with an underscore, no mutation of the
messages, no Python objects beyond the data it is handed, no files, no network. The environment
offers what Hugging Face's `apply_chat_template` and llama.cpp's minja offer templates:
trim_blocks and lstrip_blocks, loop controls (break/continue), `raise_exception`,
`strftime_now`, and a `tojson` that leaves non-ASCII text and HTML characters alone.

The rendered prompt carries its own special tokens (BOS included when the template writes
`bos_token`), so the engine tokenizes it with special tokens parsed and adds no BOS of its own,
as llama-cpp-python does for Jinja chat formats.

When the GGUF has no template, the fallback is chosen by architecture as llama.cpp users would
expect: Gemma's turn format for Gemma models, ChatML for everything else (llama.cpp's default).

A GGUF's template is checked once at load (chat_template_problem): one that renders neither a
one-message chat nor a system message and a user message is broken for every chat, so chat is
reported unavailable with that problem rather than failing on each request.
"""

from rz.errors import RequestError
from rz.template_sandbox import render_template

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


# The smallest chats a working template renders: a template may insist on a system message first.
_MINIMAL_CHATS = (
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hello"}],
)
# The load-time check's time limit: generous, so that a busy machine (the child runs at nice 19)
# never marks a working template broken; a real template renders in milliseconds.
LOAD_CHECK_SECONDS = 5.0


def render_chat(
    template: str | None,
    messages: list[dict],
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
    architecture: str | None = None,
    tools: list[dict] | None = None,
    time_limit: float | None = None,
    enable_thinking: bool | None = None,
) -> str:
    """Render messages ([{"role": str, "content": str, ...}]) with the GGUF's template, or the built-in one.

    tools (OpenAI's [{"type": "function", "function": {...}}]) are handed to the template as `tools`.

    enable_thinking, if given, is handed to the template as is (Qwen3's switch: False closes an
    empty <think> block after the generation prompt); None leaves it undefined, the template's default.

    The template runs in rz.template_sandbox's child process, under its limits on output, time
    (time_limit seconds, if given, instead of the sandbox's) and memory; whatever fails inside it
    is a RequestError naming the failure or the limit.
    """
    _check_messages(messages)
    variables = dict(messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt)
    if tools:
        variables["tools"] = tools
    if enable_thinking is not None:
        if not isinstance(enable_thinking, bool):
            raise RequestError(f"enable_thinking must be true or false, got {enable_thinking!r}")
        variables["enable_thinking"] = enable_thinking
    return render_template(template if template is not None else builtin_template(architecture), variables, time_limit)


def chat_template_problem(template: str | None, bos_token: str, eos_token: str, architecture: str | None = None) -> str | None:
    """Why a GGUF's chat template cannot render even a minimal chat (its first failure), or None
    when it renders one of them. A built-in template (the GGUF has none) is rendered too: that
    starts the sandbox's child at load, where the first chats would otherwise wait for it."""
    problems = []
    for messages in _MINIMAL_CHATS:
        try:
            render_chat(template, messages, bos_token, eos_token, architecture=architecture, time_limit=LOAD_CHECK_SECONDS)
            return None
        except RequestError as error:
            problems.append(str(error))
    return problems[0]


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
