"""A prompt admitted into an engine's slot by hand, step by step, for the prefix-reuse tests."""

import numpy as np

from rz.engine import Engine
from rz.generation import Generation, GenerationRequest
from rz.request import FinishReason, RequestOptions


def start(engine: Engine, ids: list[int], cache_prompt: bool = True) -> tuple[np.ndarray, Generation]:
    """Prefill ids into a slot, where the sequence stays running: (last position's logits, its sequence)."""
    sequence = engine.new_sequence(GenerationRequest(tuple(ids), RequestOptions(max_tokens=1, cache_prompt=cache_prompt)))
    admission = engine.begin_admission(sequence)
    while not admission.prefilled:
        engine.prefill_chunk(admission)
    logits = np.asarray(admission.logits)[0]
    engine.complete_admission(admission)
    return logits, sequence


def end(engine: Engine, sequence: Generation) -> None:
    """End a running sequence; its slot keeps its KV."""
    sequence.finish(FinishReason.LENGTH)
    engine.release(sequence)


def admit(engine: Engine, ids: list[int], cache_prompt: bool = True) -> tuple[np.ndarray, int]:
    """Prefill ids into a slot and end the request there (its slot keeps the prompt's KV):
    (last position's logits, prompt tokens taken from the cache)."""
    logits, sequence = start(engine, ids, cache_prompt)
    end(engine, sequence)
    return logits, sequence.n_cached
