"""rz: GGUF models on JAX/XLA, with the same tokens as llama.cpp."""

import importlib

from rz.errors import (
    ContextOverflowError,
    GGUFError,
    RequestError,
    RzError,
    TokenizerError,
    UnsupportedModelError,
)

__version__ = "0.1.0"

# The public names that live in modules importing NumPy, JAX or the model code, imported on first
# use (PEP 562): `import rz.tokenizer` stays free of JAX, so the long-text tokenizer's child
# process (rz.tokenizer.long_texts) starts in a fraction of a second, and so does `python -m rz info`.
_LAZY_NAMES = {
    "LLM": "rz.llm",
    "ModelConfig": "rz.config",
    "GGUFFile": "rz.gguf",
    "default_model_path": "rz.model_files",
    "Completion": "rz.request",
    "FinishReason": "rz.request",
    "RequestOptions": "rz.request",
}


def __getattr__(name):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'rz' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(set(globals()) | set(_LAZY_NAMES))


__all__ = [
    "LLM",
    "Completion",
    "FinishReason",
    "RequestOptions",
    "GGUFFile",
    "ModelConfig",
    "default_model_path",
    "RzError",
    "GGUFError",
    "UnsupportedModelError",
    "TokenizerError",
    "RequestError",
    "ContextOverflowError",
]
