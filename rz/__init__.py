"""rz: GGUF models on JAX/XLA, with the same tokens as llama.cpp."""

from rz.config import ModelConfig
from rz.errors import (
    ContextOverflowError,
    GGUFError,
    RequestError,
    RzError,
    TokenizerError,
    UnsupportedModelError,
)
from rz.gguf import GGUFFile
from rz.model_files import default_model_path
from rz.request import Completion, FinishReason, RequestOptions

__version__ = "0.1.0"


def __getattr__(name):
    # rz.LLM pulls in JAX and the model code; `python -m rz info` and the GGUF reader do not need them.
    if name == "LLM":
        from rz.llm import LLM

        return LLM
    raise AttributeError(f"module 'rz' has no attribute {name!r}")

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
