"""Each KV cache type on both real models: rz against llama.cpp with the same cache type, and both
against the float64 reference (tests/models/reference_np.py), teacher-forced over the test passage.

    python benchmarks/kv_cache_types.py [--types f32 f16 bf16 q8_0] [--json OUT]

Per model and type (K and V alike): top-1 agreement and mean KL(llama.cpp || rz) over 1,100
positions (rz.LLM.score; llama.cpp evaluating them in one batch with all logits), and mean
KL(float64 || x) over the first 256 positions for rz and for llama.cpp. llama.cpp stores a q8_0
V cache only with flash attention, so its q8_0 runs turn it on (the others run as the tests' oracle).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))

from oracle import kl_divergence, llama_cpp_logits, llama_cpp_tokenize  # noqa: E402
from reference_np import ReferenceModel  # noqa: E402

from rz.bench.passage import PASSAGE  # noqa: E402

N_POSITIONS = 1100
REFERENCE_POSITIONS = 256


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray, chunk: int = 256) -> float:
    """Mean KL(p || q) over positions, chunk by chunk (float64 log-softmaxes of all at once take gigabytes)."""
    return float(np.concatenate([kl_divergence(p_logits[i : i + chunk], q_logits[i : i + chunk]) for i in range(0, len(p_logits), chunk)]).mean())


def measure(name: str, path: Path, types: list[str]) -> list[dict]:
    import rz
    from rz.bench.llamacpp_setup import use_safe_defaults

    use_safe_defaults()

    tokens = llama_cpp_tokenize(path, PASSAGE)[:N_POSITIONS]
    reference = ReferenceModel(path).logits(tokens[:REFERENCE_POSITIONS])
    rows = []
    for cache_type in types:
        theirs = llama_cpp_logits(path, tokens, cache_type=cache_type)
        llm = rz.LLM(path, n_ctx=2048, max_batch=1, cache_type_k=cache_type, cache_type_v=cache_type)
        ours = llm.score(tokens)
        del llm
        row = {
            "model": name,
            "cache_type": cache_type,
            "top1_vs_llama_cpp": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
            "mean_kl_vs_llama_cpp": mean_kl(theirs, ours),
            "mean_kl_f64_rz": mean_kl(reference, ours[:REFERENCE_POSITIONS]),
            "mean_kl_f64_llama_cpp": mean_kl(reference, theirs[:REFERENCE_POSITIONS]),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        f"| model | cache K=V | top-1 vs llama.cpp | mean KL vs llama.cpp | KL(f64 ‖ rz) | KL(f64 ‖ llama.cpp) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['cache_type']} | {r['top1_vs_llama_cpp']:.2%} | {r['mean_kl_vs_llama_cpp']:.5f} "
            f"| {r['mean_kl_f64_rz']:.3e} | {r['mean_kl_f64_llama_cpp']:.3e} |"
        )
    return "\n".join(lines)


def main() -> None:
    from rz.model_files import gemma3_270m_path, smollm2_135m_path
    from rz_kernels.attention_kv import CACHE_TYPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", choices=CACHE_TYPES, default=list(CACHE_TYPES))
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    rows = []
    for name, path in (("gemma3-270m", gemma3_270m_path()), ("smollm2-135m", smollm2_135m_path())):
        rows += measure(name, path, args.types)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
