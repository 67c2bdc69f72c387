"""rz.LLM: the object users hold — a loaded model with its tokenizer."""

from pathlib import Path
from typing import Sequence

from rz.config import ModelConfig
from rz.gguf import GGUFFile
from rz.model_files import default_model_path


class LLM:
    """A GGUF model loaded for tokenizing and, with the engine, generating."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_model_path()
        self.gguf = GGUFFile(self.path)
        self.config = ModelConfig.from_gguf(self.gguf)
        from rz.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_gguf_metadata(self.gguf.metadata)

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of text, exactly as llama.cpp gives them; add_bos=None follows the model."""
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of a sequence of token ids."""
        return self.tokenizer.decode(ids)

    def __repr__(self) -> str:
        return f"rz.LLM({str(self.path)!r}, architecture={self.config.architecture!r})"
