"""The exception types rz raises: one per failure family, each a subclass of RzError."""


class RzError(Exception):
    """Base class of every error rz raises on purpose."""


class GGUFError(RzError, ValueError):
    """A GGUF file is malformed, truncated, or uses something rz cannot read."""


class UnsupportedModelError(RzError, ValueError):
    """The model's architecture or a tensor type is not supported by rz."""


class TokenizerError(RzError, ValueError):
    """The vocabulary is unusable, or text/ids cannot be tokenized/detokenized."""


class ChatTemplateError(RzError):
    """The model's chat template cannot render even a one-message chat: chat is unavailable with
    this model (found at load), while plain completions still work."""


class ShuttingDownError(RzError):
    """The server is shutting down and takes no more requests."""


class TemplateBusyError(RzError):
    """Too many chat templates are waiting to render at once: retry later."""


class RequestError(RzError, ValueError):
    """A generation request is invalid (empty prompt, bad sampling values, ...)."""


class ContextOverflowError(RequestError):
    """The prompt plus max_tokens does not fit in the context window."""
