"""Several processes as one mesh (rz.multihost): two processes on loopback, each with one CPU
device and gloo collectives between them, split a tiny model over a 2-device mesh and generate the
tokens one process generates alone on a mesh of two (forced) devices.

Process 0 runs the scheduler and broadcasts every step; process 1 follows. All three processes run
this file as a script, at once, without the persistent compilation cache (`python -m rz generate`
would compile the same steps, but the script also checks that process 1 refuses to drive the
model itself).

The reference is one process at tensor_parallel=2, not one device: greedy tokens are the same on
one device too, but seeded sampling at tensor_parallel=2 already parts from one device's in one
row, in one process (see benchmarks/README.md, "Several devices").
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ("The history of the printing press begins", "A recipe for bread needs flour, water and")
# Greedy, then seeded sampling (each row's PRNG key made on process 0 and sent by value).
RUNS = ({"temperature": 0.0}, {"temperature": 0.9, "top_k": 40, "seed": 11})
MAX_TOKENS = 8
ALONE = "alone"


def _generate(llm) -> list[list[list[int]]]:
    return [
        [c.token_ids for c in llm.generate(list(PROMPTS), max_tokens=MAX_TOKENS, ignore_eos=True, **options)]
        for options in RUNS
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from models.tiny_models import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("multihost") / "tiny-llama.gguf", "llama", "Q8_0", n_ff=128)


@pytest.fixture(scope="module")
def runs(tiny_model) -> list[subprocess.CompletedProcess]:
    """Process 0 and process 1 of two, then one process alone with two devices."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env |= {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    coordinator = f"127.0.0.1:{_free_port()}"
    running = [
        subprocess.Popen(
            [sys.executable, __file__, str(tiny_model), coordinator, role],
            env=env | ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"} if role == ALONE else {}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for role in ("0", "1", ALONE)
    ]
    done = []
    try:
        for process in running:
            stdout, stderr = process.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in running:
            process.kill()
    return done


def _report(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_process_finishes(runs):
    for done in runs:
        _report(done)


def test_two_processes_generate_what_one_generates(runs):
    leader, alone = _report(runs[0]), _report(runs[2])
    assert all(len(stream) == MAX_TOKENS for run in alone["tokens"] for stream in run)
    assert (leader["devices"], leader["processes"]) == (2, 2)
    assert (alone["devices"], alone["processes"]) == (2, 1)
    assert leader["tokens"] == alone["tokens"]


def test_a_follower_does_not_drive_the_model(runs):
    assert "follows process 0" in _report(runs[1])["refused"]


def test_the_environment_stands_in_for_missing_flags(monkeypatch):
    from rz.multihost import Distributed

    monkeypatch.setenv("RZ_COORDINATOR", "host0:12355")
    monkeypatch.setenv("RZ_NUM_PROCESSES", "4")
    monkeypatch.setenv("RZ_PROCESS_ID", "3")
    assert Distributed.from_flags(None, None, None) == Distributed("host0:12355", 4, 3)
    assert Distributed.from_flags("other:1", 2, 0) == Distributed("other:1", 2, 0)


def test_alone_nothing_is_asked(monkeypatch):
    from rz.multihost import Distributed, initialize

    for name in ("RZ_COORDINATOR", "RZ_NUM_PROCESSES", "RZ_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not Distributed.from_flags(None, None, None).asked
    assert initialize(Distributed()) == 0


@pytest.mark.parametrize(("distributed", "message"), [
    (("host0:1", 2, 2), "outside 0..1"),
    (("host0:1", 0, 0), "at least 1"),
])
def test_impossible_process_ids_are_refused_before_joining(distributed, message):
    from rz.multihost import Distributed, MultihostError, initialize

    with pytest.raises(MultihostError, match=message):
        initialize(Distributed(*distributed))


def test_a_variable_that_is_not_a_number_is_named(monkeypatch):
    from rz.multihost import Distributed, MultihostError

    monkeypatch.setenv("RZ_PROCESS_ID", "zero")
    with pytest.raises(MultihostError, match="RZ_PROCESS_ID='zero'"):
        Distributed.from_flags("host0:1", 2, None)


def _main(path: str, coordinator: str, role: str) -> None:
    from rz import multihost

    if role != ALONE:
        multihost.initialize(multihost.Distributed(coordinator, 2, int(role)))
    import jax

    import rz

    llm = rz.LLM(path, n_ctx=128, max_batch=2, compilation_cache=False, tensor_parallel=2)
    if role == "1":
        try:
            llm.generate(PROMPTS[0], max_tokens=1)
            report = {"refused": ""}
        except multihost.MultihostError as error:
            report = {"refused": str(error)}
        multihost.follow(llm.model)
    else:
        try:
            report = {"devices": llm.model.plan.mesh.devices.size, "processes": jax.process_count(), "tokens": _generate(llm)}
        finally:
            multihost.close(llm.model)  # process 0 lets process 1 go; alone, nothing to do
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], sys.argv[3])
