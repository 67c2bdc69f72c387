"""Tensor parallelism (rz.sharding): a model split over a mesh of forced CPU devices gives one
device's logits, greedy tokens, decode log-probabilities and seeded top-k samples; a shape that
does not divide is a clear error.

The forced devices must exist before JAX starts, so the comparisons run in one subprocess (this
file run as a script, XLA_FLAGS set), which loads each model once per tensor-parallel size and
reports the logits' NMSE against one device and both token streams.

The prompts (up to PROMPT_TOKENS tokens) are longer than rz_kernels' CPU_KERNEL_MAX_M, so their
prefill takes the prompt paths: the C++ kernels' int8 GEMM, which computes a weight row the same
whatever rows a shard holds, or XLA's f32 GEMM on a weight padded to whole panels, which then does
too (tests/kernels/test_kernel_qmatmul.py checks that path on its own, on any CPU).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rz.config import ModelConfig
from rz.gguf import GGUFFile
from rz.sharding import ShardingError, plan

ROOT = Path(__file__).resolve().parents[2]
N_DEVICES = 8
MAX_NMSE = 1e-6
PROMPT_TOKENS = 40
PROMPTS = (
    "The history of the printing press begins in China, where woodblocks were carved for centuries before"
    " movable type reached Europe and Gutenberg's workshop",
    "A recipe for bread needs flour, water and salt; the yeast, the kneading and the long rise at a warm"
    " temperature decide",
)

# (name, tiny-model overrides or a real model's path function, tensor-parallel sizes)
TINY_CASES = {
    # 4 query heads over 2 KV heads, split as they are.
    "tiny-llama": ("llama", {"n_ff": 128}, (2,)),
    # 8 query heads, 2 KV heads copied 4 times over TP 8.
    "tiny-llama-8-heads": ("llama", {"n_head": 8, "n_ff": 256, "head_dim": 16}, (8,)),
    # QK-norm, sliding-window layers, GeGLU, tied embeddings, one KV head copied.
    "tiny-gemma3": ("gemma3", {"n_head_kv": 1}, (2,)),
}
REAL_CASES = {"smollm2": ("smollm2_135m_path", (3,)), "gemma3-270m": ("gemma3_270m_path", (2, 4))}
# Decode log-probabilities of one device's greedy tokens, and a seeded top-k run.
MAX_LOGPROB_DIFF = 1e-5
N_LOGPROBS = 3
SAMPLING = {"temperature": 0.9, "top_k": 20, "seed": 7}


def _run(cases: dict, tmp: Path) -> dict:
    """Each case's NMSE and token streams per tensor-parallel size (and one device's), from the subprocess."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={N_DEVICES}", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, __file__, json.dumps(cases), str(tmp)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return _run({"tiny": TINY_CASES, "real": REAL_CASES}, tmp_path_factory.mktemp("tensor_parallel"))


def _each_size(cases: dict) -> list:
    return [(name, size) for name, case in cases.items() for size in case[-1]]


@pytest.mark.parametrize(("name", "size"), _each_size(TINY_CASES) + _each_size(REAL_CASES))
def test_logits_match_one_device(results, name, size):
    assert results[name][str(size)]["nmse"] <= MAX_NMSE


@pytest.mark.parametrize(("name", "size"), _each_size(TINY_CASES) + _each_size(REAL_CASES))
def test_greedy_tokens_match_one_device_in_a_batch(results, name, size):
    one = results[name]["1"]["tokens"]
    assert all(len(stream) > 0 for stream in one)
    assert results[name][str(size)]["tokens"] == one


@pytest.mark.parametrize(("name", "size"), _each_size(TINY_CASES) + _each_size(REAL_CASES))
def test_decode_logprobs_match_one_device(results, name, size):
    one = np.asarray(results[name]["1"]["logprobs"])
    assert one.size > 0
    assert np.abs(np.asarray(results[name][str(size)]["logprobs"]) - one).max() <= MAX_LOGPROB_DIFF


@pytest.mark.parametrize(("name", "size"), _each_size(TINY_CASES) + _each_size(REAL_CASES))
def test_seeded_top_k_samples_match_one_device(results, name, size):
    assert results[name][str(size)]["sampled"] == results[name]["1"]["sampled"]


def _smollm2_config() -> ModelConfig:
    from rz.model_files import smollm2_135m_path

    return ModelConfig.from_gguf(GGUFFile(smollm2_135m_path()))


def test_query_heads_that_do_not_divide_name_the_dimension():
    with pytest.raises(ShardingError, match=r"9 query heads \(attention.head_count\) do not divide over 2 devices"):
        plan(_smollm2_config(), 2)


def test_kv_heads_that_neither_divide_nor_replicate_are_an_error():
    from dataclasses import replace

    # 12 query heads and 3 KV heads over 4 devices: 3 KV heads neither split nor copy evenly.
    with pytest.raises(ShardingError, match=r"3 KV heads"):
        plan(replace(_smollm2_config(), n_head=12, n_ff=1536, n_vocab=49152), 4)


def test_width_scaled_queries_are_refused_rather_than_scaled_per_shard():
    from dataclasses import replace

    from rz.model_files import gemma3_270m_path

    gemma = ModelConfig.from_gguf(GGUFFile(gemma3_270m_path()))
    with pytest.raises(ShardingError, match="62-layer gemma3"):
        plan(replace(gemma, n_layer=62, sliding_layers=(False,) * 62), 2)


def test_too_few_devices_says_how_to_get_more():
    import jax

    with pytest.raises(ShardingError, match="xla_force_host_platform_device_count=3"):
        plan(_smollm2_config(), 3, devices=jax.devices()[:1])


@pytest.mark.parametrize("size", [0, -1, True, 2.0])
def test_tensor_parallel_must_be_a_positive_integer(size):
    with pytest.raises(ShardingError, match="positive integer"):
        plan(_smollm2_config(), size)


def test_replicas_that_need_more_devices_than_there_are_say_how_many():
    from rz.model_files import smollm2_135m_path
    from rz.models import load_replicas

    with pytest.raises(ShardingError, match="64 replicas of 1 devices each need 64 devices"):
        load_replicas(GGUFFile(smollm2_135m_path()), _smollm2_config(), 1, 64)


@pytest.mark.parametrize("replicas", [0, True])
def test_replicas_must_be_a_positive_integer(replicas):
    from rz.model_files import smollm2_135m_path
    from rz.models import load_replicas

    with pytest.raises(ShardingError, match="data_parallel must be a positive integer"):
        load_replicas(GGUFFile(smollm2_135m_path()), _smollm2_config(), 1, replicas)


def _decode(llm, prompts: list[list[int]]) -> dict:
    """The prompts decoded together as one batch: greedy tokens, their log-probabilities and the
    top N_LOGPROBS', and a seeded top-k run's tokens."""
    greedy = llm.generate(prompts, max_tokens=8, temperature=0, ignore_eos=True, logprobs=N_LOGPROBS)
    sampled = llm.generate(prompts, max_tokens=8, ignore_eos=True, **SAMPLING)
    return {
        "tokens": [c.token_ids for c in greedy],
        "logprobs": [[[t["logprob"], *(p for _, p in t["top"])] for t in c.logprobs] for c in greedy],
        "sampled": [c.token_ids for c in sampled],
    }


def _main(cases: dict, tmp: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import rz
    from rz import model_files
    from models.tiny_models import write_tiny_model

    paths = {name: (write_tiny_model(tmp / f"{name}.gguf", arch, "Q8_0", **overrides), sizes)
             for name, (arch, overrides, sizes) in cases["tiny"].items()}
    paths |= {name: (getattr(model_files, function)(), sizes) for name, (function, sizes) in cases["real"].items()}
    report = {}
    for name, (path, sizes) in paths.items():
        one = rz.LLM(path, n_ctx=128, max_batch=2, compilation_cache=False)
        prompts = [one.tokenize(prompt)[:PROMPT_TOKENS] for prompt in PROMPTS]
        reference = one.score(prompts[0])
        report[name] = {"1": {"nmse": 0.0, **_decode(one, prompts)}}
        del one
        for size in sizes:
            split = rz.LLM(path, n_ctx=128, max_batch=2, compilation_cache=False, tensor_parallel=size)
            nmse = float(np.sum((split.score(prompts[0]) - reference) ** 2) / np.sum(reference**2))
            report[name][str(size)] = {"nmse": nmse, **_decode(split, prompts)}
            del split
    print(json.dumps(report))


if __name__ == "__main__":
    _main(json.loads(sys.argv[1]), Path(sys.argv[2]))
