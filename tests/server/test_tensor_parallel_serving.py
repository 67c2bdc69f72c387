"""Serving over two devices: the server streams, batches and cancels as with one device.

A tiny llama (4 query heads, 2 KV heads) is served over two devices in three ways: split over
them in one process with two forced CPU devices (`--tensor-parallel 2`); split over two processes
on loopback, one CPU device each, where process 0 serves and process 1 follows it (rz.multihost);
and as two replicas, one per device, behind the one queue (`--data-parallel 2`). Greedy answers
are compared with rz.LLM on one device, which gives this model's tokens to the bit
(tests/models/test_tensor_parallel.py).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

import rz
from rz.api.v1 import inference_pb2 as pb
from rz.api.v1 import inference_pb2_grpc as pb_grpc
from server_process import MAX_BATCH, N_CTX, generate_concurrently, start_server, wait_for

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The history of the printing press", "A recipe for bread", "Once upon a time", "Water boils at", "Dear Sir", "Roses are red"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from models.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tp-serving") / "tiny-llama.gguf", "llama", "Q8_0", n_ff=128)


@pytest.fixture(scope="module")
def one_device(tiny_model):
    return rz.LLM(tiny_model, n_ctx=N_CTX, max_batch=MAX_BATCH, compilation_cache=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


REPLICAS = {"two-devices": 1, "two-processes": 1, "two-replicas": 2}


@pytest.fixture(scope="module", params=list(REPLICAS))
def server(request, tiny_model, tmp_path_factory):
    """A server of the tiny model over two devices (and its follower, for two processes), each
    process with a compilation cache of its own, fresh."""

    def env():
        cache = tmp_path_factory.mktemp("compilation-cache")
        return {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"} | {"RZ_COMPILATION_CACHE": str(cache)}

    served = ("--model", str(tiny_model), *(("--data-parallel", "2") if REPLICAS[request.param] > 1 else ("--tensor-parallel", "2")))
    follower = None
    if request.param == "two-processes":
        hosts = ("--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2")
        follower = subprocess.Popen(
            [sys.executable, "-m", "rz", "serve", *served, "--n-ctx", str(N_CTX), "--max-batch", str(MAX_BATCH),
             *hosts, "--process-id", "1"],
            env=env(), stderr=subprocess.PIPE, text=True,
        )
        served += (*hosts, "--process-id", "0")
    running = start_server(*served, env=env())
    running.replicas = REPLICAS[request.param]
    yield running
    assert running.terminate(timeout=60) == 0, "".join(running.log[-20:])
    if follower is not None:
        _, log = follower.communicate(timeout=60)
        assert follower.returncode == 0, log[-4000:]
        assert "following process 0" in log and "listening" not in log  # only process 0 serves


def test_a_stream_is_what_one_device_generates(server, one_device):
    expected = one_device.generate(PROMPTS[0], max_tokens=8, temperature=0.0, ignore_eos=True)
    with server.client() as client:
        chunks = list(client.stream(PROMPTS[0], 8, temperature=0.0, ignore_eos=True))
    assert len(chunks) > 1
    assert [token for chunk in chunks for token in chunk.token_ids] == expected.token_ids
    assert chunks[-1].finish_reason == "length"


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, one_device):
    """More clients than slots: requests join and leave the batch between steps. Whole prefills on
    both sides (cache_prompt=False): which prefixes each replica holds depends on the order requests
    land, and a reused prefix equals a fresh prefill only to the consistency tolerance, which flips
    a near-tie first token here on the AVX-512 VNNI kernels."""
    expected = [one_device.generate(p, max_tokens=6, temperature=0.0, ignore_eos=True, cache_prompt=False).token_ids for p in PROMPTS]
    lengths = [6 - index % 3 for index in range(len(PROMPTS))]
    results = generate_concurrently(server, PROMPTS, lengths, temperature=0.0, ignore_eos=True, cache_prompt=False)
    for prompt, got, want, n in zip(PROMPTS, results, expected, lengths):
        assert got.token_ids == want[:n], prompt


def test_every_replica_adds_its_slots(server):
    assert server.metrics()[("rz_slots", ())] == MAX_BATCH * server.replicas


def test_a_cancelled_request_frees_its_slot(server):
    """Every slot of every replica taken; one request cancelled; a new one is served."""
    long = pb.GenerateRequest(prompt="Tell me a long story.", options=pb.GenerationOptions(max_tokens=N_CTX // 2, temperature=0.0, ignore_eos=True))
    channels = [grpc.insecure_channel(server.target) for _ in range(MAX_BATCH * server.replicas)]
    calls = [pb_grpc.InferenceServiceStub(channel).Generate(long) for channel in channels]
    for call in calls:
        next(call)  # every slot is taken
    assert server.metrics()[("rz_active_slots", ())] == MAX_BATCH * server.replicas
    calls[0].cancel()
    with server.client() as client:
        last = list(client.stream(PROMPTS[1], 2, temperature=0.0))[-1]
    assert last.finish_reason == "length"
    for call in calls[1:]:
        call.cancel()
    for channel in channels:
        channel.close()
    wait_for(lambda: server.metrics().get(("rz_active_slots", ()), 0.0) == 0)
