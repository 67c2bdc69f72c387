"""speculative="self" by draft depth L (issue 20): drafts made and kept, and tok/s against plain
decoding, batch 1, greedy, on the workloads of `python -m rz.bench speculative` (128 tokens; the
second of two rounds is printed, the first compiles).

Usage: python benchmarks/self_draft_depth.py smollm2|gemma3 L1,L2,...
"""

import sys

import rz
from rz.bench.speculative import WORKLOADS
from rz.model_files import gemma3_270m_path, smollm2_135m_path

MODELS = {"smollm2": smollm2_135m_path, "gemma3": gemma3_270m_path}


def one_run(llm, ids, proposer):
    """(proposer, tok/s, drafted, kept) of one generation."""
    engine = llm._current
    drafted, kept = (engine.n_drafted, engine.n_accepted) if engine else (0, 0)
    done = llm.generate(ids, max_tokens=128, temperature=0, speculative=proposer)
    engine = llm._current
    rate = (len(done.token_ids) - 1) / done.timings["decode_seconds"]
    return proposer, round(rate, 1), engine.n_drafted - drafted, engine.n_accepted - kept


def main(name: str, depths: str) -> None:
    for layers in map(int, depths.split(",")):
        llm = rz.LLM(MODELS[name](), n_ctx=2048, max_batch=1, self_draft_layers=layers)
        for workload, text in WORKLOADS.items():
            ids = llm.chat_prompt_ids([{"role": "user", "content": text}])
            runs = [one_run(llm, ids, proposer) for proposer in ("off", "self", "off", "self")]
            print(name, layers, workload, runs[2:], flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
