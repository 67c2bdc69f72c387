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
from rz.llm import LLM
from rz.model_files import default_model_path

__version__ = "0.1.0"

__all__ = [
    "LLM",
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
