"""Where a chat turn's time goes once its shapes are compiled (issue 17): rz.bench chat's turns
admitted straight into an Engine, each part synced and timed: the row copy of a reused prefix,
the prompt chunks, then the first token and the insertion. A first pass compiles; the second
is printed, then turn 10 prefilled whole twice.

    flock -x /tmp/rz-cpu.lock python benchmarks/chat_turn_profile.py
"""

import time

import jax

import rz
from rz.bench.chat import conversation
from rz.engine import Engine
from rz.generation import GenerationRequest
from rz.model_files import smollm2_135m_path
from rz.request import FinishReason, RequestOptions

N_CTX = 4096


def timed_turn(engine: Engine, ids: list[int], cache_prompt: bool = True) -> dict:
    sequence = engine.new_sequence(GenerationRequest(tuple(ids), RequestOptions(max_tokens=1, cache_prompt=cache_prompt)))
    started = time.perf_counter()
    admission = engine.begin_admission(sequence)
    copied = time.perf_counter()
    while not admission.prefilled:
        engine.prefill_chunk(admission)
    admission.wait()
    prefilled = time.perf_counter()
    engine.complete_admission(admission)
    jax.block_until_ready(engine.cache)
    done = time.perf_counter()
    sequence.finish(FinishReason.LENGTH)
    engine.release(sequence)
    return {
        "n": len(ids), "cached": sequence.n_cached, "chunks": len(admission.chunks),
        "begin_s": round(copied - started, 3), "prefill_s": round(prefilled - copied, 3),
        "first_token_and_insert_s": round(done - prefilled, 3), "total_s": round(done - started, 3),
    }


def main() -> None:
    llm = rz.LLM(smollm2_135m_path(), n_ctx=N_CTX, max_batch=1)
    prompts = conversation(lambda text: llm.tokenize(text, add_bos=False), llm.chat_prompt_ids, 10, 100, 16)
    engine = Engine(llm.model, llm.tokenizer, N_CTX, 1)
    for _ in range(2):
        engine.blocks.clear_cache()  # each pass starts from an empty cache
        rows = [timed_turn(engine, ids) for ids in prompts]
    for row in rows:
        print(row)
    for _ in range(2):
        print("turn 10 prefilled whole:", timed_turn(engine, prompts[-1], cache_prompt=False))


if __name__ == "__main__":
    main()
