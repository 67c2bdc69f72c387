"""llama.cpp-identical tokenization of GGUF vocabularies (SentencePiece and byte-level BPE)."""

from rz.tokenizer.tokenizer import IncrementalDecoder, Tokenizer

__all__ = ["Tokenizer", "IncrementalDecoder"]
