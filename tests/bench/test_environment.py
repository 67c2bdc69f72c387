"""What each result records about the machine, the software and the model; the bandwidth figures."""

import hashlib

import pytest

from rz.bench.bandwidth import achieved_bandwidth, measure_copy_bandwidth
from rz.bench.environment import capture_environment, file_sha256, model_facts
from rz.bench.errors import PreflightError


def test_environment_names_machine_software_and_commit():
    environment = capture_environment()
    cpu = environment["cpu"]
    assert cpu["model"] and cpu["logical_cores"] >= 1 and 1 <= cpu["usable_cores"] <= cpu["logical_cores"]
    assert isinstance(cpu["flags"], list)
    assert environment["memory_bytes"] > 0 and environment["python"].startswith("CPython")
    packages = environment["packages"]
    assert packages["rz"] and packages["numpy"] and "jax" in packages and "llama_cpp_python" in packages
    assert set(environment["rz_git"]) == {"commit", "dirty"}


def test_sha256_is_the_file_hash_and_is_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("RZ_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"gguf bytes" * 1000)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert file_sha256(model) == expected
    assert expected in (tmp_path / "cache" / "bench-sha256.json").read_text()
    model.write_bytes(b"other bytes" * 1000)  # a new size and mtime: hashed again
    assert file_sha256(model) == hashlib.sha256(model.read_bytes()).hexdigest()


def test_model_facts_of_smollm2(smollm2_path):
    facts = model_facts(smollm2_path)
    assert (facts["architecture"], facts["quantization"]) == ("llama", "Q4_1")
    assert facts["description"] == "llama 135M Q4_1"
    assert 130e6 < facts["parameters"] < 140e6
    # Tied embeddings (no output.weight): each decode step reads the embedding matrix whole.
    assert facts["weight_bytes_per_token"] == facts["tensor_bytes"] <= facts["file_bytes"]


def test_a_file_that_is_not_gguf_fails_preflight(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\0" * 3)
    with pytest.raises(PreflightError, match="fake.gguf is not a usable GGUF file"):
        model_facts(fake)


def test_copy_bandwidth_and_achieved_bandwidth():
    measured = measure_copy_bandwidth(threads=2, array_bytes=8 << 20, repeats=2)
    assert measured["gb_per_s"] > 0.1 and measured["threads"] == 2 and measured["array_bytes"] == 8 << 20
    # 100 MB of weights at 50 tok/s in batches of 2: 25 steps/s read 2.5 GB/s, a quarter of 10.
    figures = achieved_bandwidth(100_000_000, 50.0, 2, 10.0)
    assert figures == pytest.approx({"achieved_gb_per_s": 2.5, "fraction_of_machine": 0.25})
    assert achieved_bandwidth(100_000_000, 50.0, 1, None)["fraction_of_machine"] is None


def test_model_facts_of_a_mixture_of_experts_count_the_active_experts(tmp_path):
    from models.tiny_models import DEFAULT_SHAPES, write_tiny_model

    path = write_tiny_model(tmp_path / "moe.gguf", "qwen3moe", "Q8_0", quantize_only="_exps")
    facts = model_facts(path)
    shape = DEFAULT_SHAPES["qwen3moe"]
    expert_bytes = sum(info.nbytes for name, info in _tensors(path).items() if "_exps." in name)
    # Tied embeddings: every byte is read, except the experts not chosen (2 of 8 are).
    inactive = expert_bytes - expert_bytes * shape.n_expert_used // shape.n_expert
    assert inactive > 0 and facts["weight_bytes_per_token"] == facts["tensor_bytes"] - inactive


def _tensors(path):
    from rz.gguf import GGUFFile

    with GGUFFile(path) as model:
        return dict(model.tensors)
