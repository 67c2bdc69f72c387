"""Where a chat turn's time goes once its shapes are compiled (issue 17): rz.bench chat's turns
admitted straight into an Engine, each part synced and timed: the row copy of a reused prefix,
each prompt chunk, then the first token and the insertion. A first pass compiles; each turn's
line is the median of the passes after it (each pass from an empty prefix cache), then turn 10
is prefilled whole twice.

    flock -x /tmp/rz-cpu.lock python benchmarks/chat_turn_profile.py [--passes 6]
"""

import argparse
import statistics
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
    chunk_s = []
    while not admission.prefilled:
        chunk_started = time.perf_counter()
        engine.prefill_chunk(admission)
        admission.wait()
        chunk_s.append(time.perf_counter() - chunk_started)
    prefilled = time.perf_counter()
    engine.complete_admission(admission)
    jax.block_until_ready(engine.cache)
    done = time.perf_counter()
    sequence.finish(FinishReason.LENGTH)
    engine.release(sequence)
    return {
        "n": len(ids), "cached": sequence.n_cached, "chunks": [length for _, length in admission.chunks],
        "begin_s": copied - started, "chunk_s": chunk_s, "prefill_s": prefilled - copied,
        "first_token_and_insert_s": done - prefilled, "total_s": done - started,
    }


def median_row(rows: list[dict]) -> dict:
    """The passes' medians of each time (each chunk's apart), to the millisecond."""
    row = {key: rows[0][key] for key in ("n", "cached", "chunks")}
    for key in ("begin_s", "prefill_s", "first_token_and_insert_s", "total_s"):
        row[key] = round(statistics.median(r[key] for r in rows), 3)
    row["chunk_s"] = [round(statistics.median(times), 3) for times in zip(*(r["chunk_s"] for r in rows))]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=2, help="passes of the chat; the first compiles (default: 2)")
    args = parser.parse_args()
    llm = rz.LLM(smollm2_135m_path(), n_ctx=N_CTX, max_batch=1)
    prompts = conversation(lambda text: llm.tokenize(text, add_bos=False), llm.chat_prompt_ids, 10, 100, 16)
    engine = Engine(llm.model, llm.tokenizer, N_CTX, 1)
    passes = []
    for _ in range(max(args.passes, 2)):
        engine.blocks.clear_cache()  # each pass starts from an empty cache
        passes.append([timed_turn(engine, ids) for ids in prompts])
    turns = [median_row(list(rows)) for rows in zip(*passes[1:])]
    for row in turns:
        print(row)
    print(f"turn 10 / turn 1: {turns[-1]['total_s'] / turns[0]['total_s']:.2f}")
    for _ in range(2):
        print("turn 10 prefilled whole:", median_row([timed_turn(engine, prompts[-1], cache_prompt=False)]))


if __name__ == "__main__":
    main()
