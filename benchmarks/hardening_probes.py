"""Issue 23's probes against `rz serve` on 127.0.0.1: each attack's effect on an unrelated request and on memory.

    python benchmarks/hardening_probes.py [--out benchmarks/results/hardening-probes.json]

For each attack it runs a 50-token greedy Generate (the unrelated request) while the attack is in
flight, and samples the server's resident memory every 20 ms. The chat-template attack needs a
model whose template misbehaves on one message only (one that fails on every message is reported
at load time), so the script writes a copy of SmolLM2 with such a template.
"""

import argparse
import json
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from rz.client import Client
from rz.model_files import smollm2_135m_path
from rz.stopping import MAX_STOP_CHARS, MAX_STOPS

# Renders normally, except for a user message 'boom', where it tries to build 10 GB of text.
HOSTILE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] == 'boom' %}{{ 'a' * 10**10 }}{% endif %}"
    "{% if message['content'] == 'spin' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def write_hostile_model(path: Path) -> Path:
    """SmolLM2 with HOSTILE_TEMPLATE as its chat template, every tensor copied as stored."""
    import gguf

    reader = gguf.GGUFReader(smollm2_135m_path())
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(path), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "tokenizer.chat_template"):
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), value_type, sub_type=sub_type)
    writer.add_chat_template(HOSTILE_TEMPLATE)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class MemorySampler:
    """The peak resident memory of a process between start() and stop(), sampled every 20 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def rss(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) << 10
        return 0

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def unrelated_latency(target: str) -> float:
    with Client(target, timeout=300) as client:
        start = time.perf_counter()
        client.generate("The capital of France is", 50, temperature=0.0, ignore_eos=True)
        return time.perf_counter() - start


def run_attack(target: str, pid: int, attack, copies: int) -> dict:
    """Start `copies` threads of attack(client) -> status name, then time the unrelated request."""
    statuses = []

    def one():
        with Client(target, timeout=120) as client:
            try:
                attack(client)
                statuses.append("OK")
            except grpc.RpcError as error:
                statuses.append(error.code().name)

    with MemorySampler(pid) as memory:
        before = memory.rss()
        threads = [threading.Thread(target=one) for _ in range(copies)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)  # the attack is under way
        latency = unrelated_latency(target)
        for thread in threads:
            thread.join()
    return {
        "unrelated_seconds": round(latency, 3), "peak_rss_mb": memory.peak >> 20,
        "rss_rise_mb": (memory.peak - before) >> 20, "statuses": sorted(set(statuses)),
    }


def attacks() -> dict:
    long_stops = [f"{i:03d}" + "x" * (MAX_STOP_CHARS - 3) for i in range(MAX_STOPS - 1)]
    partial = "The capital of France is"  # the output of a greedy continuation starts with " Paris"
    return {
        "chat template 'a' * 10**10 (x3)": (lambda c: c.chat([{"role": "user", "content": "boom"}], 5), 3),
        "chat template nested range loops (x3)": (lambda c: c.chat([{"role": "user", "content": "spin"}], 5), 3),
        # The stop-string rows run three 200-token generations beside the unrelated request: this
        # row is the same without stop strings, so the difference is the stop strings' cost.
        "control: three plain 200-token generations (x3)": (
            lambda c: c.generate(partial, 200, temperature=0.0, ignore_eos=True), 3),
        f"stop strings at the limit, {MAX_STOPS} x {MAX_STOP_CHARS} chars, one partial (x3)": (
            lambda c: c.generate(partial, 200, temperature=0.0, ignore_eos=True,
                                 stop=long_stops + [" Paris" + "y" * (MAX_STOP_CHARS - 6)]), 3),
        "stop strings over the limit, 1000 x 1003 chars (x3)": (
            lambda c: c.generate(partial, 200, stop=["z" * 1003 + str(i) for i in range(1000)]), 3),
        "Tokenize 1 MB of one letter (x8)": (lambda c: c.tokenize("a" * 1_000_000), 8),
    }


def undecodable(target: str) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        codes = []
        for payload in (b"\xff\xff\xff\xff", b"\x0a\x02\xff\xfe"):
            try:
                channel.unary_unary("/rz.v1.InferenceService/Tokenize")(payload, timeout=10)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)
        return codes


def soak(target: str, pid: int, count: int) -> dict:
    rng = np.random.default_rng(0)
    sampler = MemorySampler(pid)
    samples = []
    with Client(target, timeout=120) as client:
        for index in range(count):
            kind = rng.integers(4)
            try:
                if kind == 0:
                    client.generate("Once upon a time", int(rng.integers(1, 40)), temperature=0.8, seed=index)
                elif kind == 1:
                    client.chat([{"role": "user", "content": f"Say {index}"}], int(rng.integers(1, 20)))
                elif kind == 2:
                    client.tokenize("word " * int(rng.integers(1, 500)))
                else:
                    client.generate("x", 5, stop=["a", "the"], temperature=0.0)
            except grpc.RpcError as error:
                samples.append(error.code().name)
            if index % 50 == 0:
                samples.append(sampler.rss())
    sizes = [sample for sample in samples if isinstance(sample, int)]
    errors = [sample for sample in samples if isinstance(sample, str)]
    return {
        "requests": count, "errors": errors, "rss_first_mb": sizes[0] >> 20, "rss_last_mb": sizes[-1] >> 20,
        "drift_after_first_quarter_percent": round(100 * (sizes[-1] - sizes[len(sizes) // 4]) / sizes[len(sizes) // 4], 1),
    }


def main() -> None:
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
    from server_process import start_server

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--soak", type=int, default=300)
    parser.add_argument("--only", default="", help="run only the attacks whose name contains this")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = write_hostile_model(Path(scratch) / "smollm2-hostile-template.gguf")
        server = start_server("--model", str(model), "--max-batch", "8", "--max-queue", "64")
        try:
            target, pid = server.target, server.process.pid
            unrelated_latency(target)  # warm
            baseline = min(unrelated_latency(target) for _ in range(3))
            results = {"baseline_unrelated_seconds": round(baseline, 3), "attacks": {}}
            with MemorySampler(pid) as memory:
                results["baseline_rss_mb"] = memory.rss() >> 20
            for name, (attack, copies) in attacks().items():
                if args.only not in name:
                    continue
                outcome = run_attack(target, pid, attack, copies)
                outcome["slowdown"] = round(outcome["unrelated_seconds"] / baseline, 2)
                results["attacks"][name] = outcome
                print(name, outcome, flush=True)
            results["undecodable_requests"] = undecodable(target)
            if args.soak:
                results["soak"] = soak(target, pid, args.soak)
            print(json.dumps(results, indent=2))
            if args.out:
                args.out.write_text(json.dumps(results, indent=2) + "\n")
        finally:
            server.terminate(timeout=60)


if __name__ == "__main__":
    main()
