"""Dump what a checkout of rz computes on both real models, to compare two checkouts bit for bit.

Run it from the root of the checkout under test (its `rz` is the one imported):

    python benchmarks/equivalence/dump_outputs.py OUT.npz
    python benchmarks/equivalence/dump_outputs.py --compare A.npz B.npz

It stores teacher-forced logits (`LLM.score`), greedy tokens of one prompt, of a batch of prompts
decoded together, and of a seeded sampled run, for Gemma 3 270M and SmolLM2 135M. A redesign that
holds behaviour fixed leaves every array identical.
"""

import argparse
import sys

import numpy as np

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]
SAMPLED = dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=5)


def dump(path: str) -> None:
    import rz
    from rz.model_files import gemma3_270m_path, smollm2_135m_path

    arrays = {}
    for name, model_path in (("gemma3", gemma3_270m_path()), ("smollm2", smollm2_135m_path())):
        llm = rz.LLM(model_path, n_ctx=512, max_batch=4)
        ids = llm.tokenize("In a hole in the ground there lived a hobbit. " * 8)
        arrays[f"{name}/score"] = llm.score(ids)
        arrays[f"{name}/greedy"] = np.asarray(llm.generate(PROMPTS[0], max_tokens=48, temperature=0.0, ignore_eos=True).token_ids)
        batch = llm.generate(PROMPTS, max_tokens=24, temperature=0.0, ignore_eos=True)
        for index, completion in enumerate(batch):
            arrays[f"{name}/batch{index}"] = np.asarray(completion.token_ids)
        arrays[f"{name}/sampled"] = np.asarray(llm.generate(PROMPTS[1], max_tokens=24, ignore_eos=True, **SAMPLED).token_ids)
        print(f"{name}: {rz.__file__}", file=sys.stderr)
    np.savez(path, **arrays)


def compare(first: str, second: str) -> int:
    a, b = np.load(first), np.load(second)
    if set(a.files) != set(b.files):
        print(f"different arrays: {sorted(set(a.files) ^ set(b.files))}")
        return 1
    differing = [name for name in a.files if a[name].shape != b[name].shape or not np.array_equal(a[name], b[name])]
    for name in a.files:
        print(f"{name:18s} {str(a[name].shape):14s} {'identical' if name not in differing else 'DIFFERENT'}")
    return 1 if differing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", action="store_true", help="compare two dumps instead of writing one")
    parser.add_argument("paths", nargs="+")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.paths)
    dump(args.paths[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
