"""Issue 23's probes against `rz serve` on 127.0.0.1: each attack's effect on an unrelated request and on memory.

    python benchmarks/hardening_probes.py [--out benchmarks/results/hardening-probes.json]

For each attack it times a 50-token greedy Generate (the unrelated request) again and again
while the attack is in flight (at least once, at most UNRELATED_SAMPLES times) and reports the
worst, against the median of as many runs alone. It samples resident memory every 20 ms: the
server's, and the server's with its child processes' (the chat-template sandbox). The
chat-template attack needs a model whose template misbehaves on one message only (one that fails
on every message is reported at load time), so the script writes a copy of SmolLM2 with such a
template. Attacks go through gRPC and through the HTTP API.
"""

import argparse
import json
import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from rz.client import Client
from rz.errors import RzError
from rz.model_files import smollm2_135m_path
from rz.stopping import MAX_STOP_CHARS, MAX_STOPS

UNRELATED_SAMPLES = 5
MEGABYTE_TEXT = "a" * 1_000_000  # one letter: one pre-tokenized word, the tokenizer's worst case

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


def rss(pid: int) -> int:
    """A process's resident memory in bytes (0 once it has ended)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) << 10
    except FileNotFoundError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as listing:
            return [int(child) for child in listing.read().split()]
    except FileNotFoundError:
        return []


class MemorySampler:
    """The peak resident memory of a process, alone and with its children, between start() and stop(), sampled every 20 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.peak_tree, self._stop = pid, 0, 0, threading.Event()

    def rss(self) -> int:
        return rss(self.pid)

    def tree_rss(self) -> int:
        return self.rss() + sum(rss(child) for child in children(self.pid))

    def __enter__(self):
        self.peak, self.peak_tree = self.rss(), self.tree_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.rss())
            self.peak_tree = max(self.peak_tree, self.tree_rss())

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()


def unrelated_latency(target: str) -> float:
    with Client(target, timeout=300) as client:
        start = time.perf_counter()
        client.generate("The capital of France is", 50, temperature=0.0, ignore_eos=True)
        return time.perf_counter() - start


def http_post(base_url: str, path: str, body: dict) -> int:
    """POST a JSON body; the HTTP status (the response is read and dropped)."""
    request = urllib.request.Request(base_url + path, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def run_attack(target: str, http_url: str, pid: int, attack, copies: int) -> dict:
    """Start `copies` threads of attack(client, http_url), then time the unrelated request until they end."""
    statuses = []

    def one():
        with Client(target, timeout=120) as client:
            try:
                outcome = attack(client, http_url)
                statuses.append(f"HTTP {outcome}" if isinstance(outcome, int) else "OK")
            except grpc.RpcError as error:
                statuses.append(error.code().name)
            except RzError as error:  # rz.client checks some options before sending
                statuses.append(f"refused by the client: {type(error).__name__}")

    with MemorySampler(pid) as memory:
        before, before_tree = memory.rss(), memory.tree_rss()
        threads = [threading.Thread(target=one) for _ in range(copies)]
        for thread in threads:
            thread.start()
        time.sleep(0.2)  # the attack is under way
        latencies = [unrelated_latency(target)]
        while len(latencies) < UNRELATED_SAMPLES and any(thread.is_alive() for thread in threads):
            latencies.append(unrelated_latency(target))
        for thread in threads:
            thread.join()
    return {
        "unrelated_seconds_worst": round(max(latencies), 3), "unrelated_samples": len(latencies),
        "peak_rss_mb": memory.peak >> 20, "rss_rise_mb": (memory.peak - before) >> 20,
        "peak_rss_with_children_mb": memory.peak_tree >> 20, "rss_with_children_rise_mb": (memory.peak_tree - before_tree) >> 20,
        "statuses": sorted(set(statuses)),
    }


def attacks() -> dict:
    long_stops = [f"{i:03d}" + "x" * (MAX_STOP_CHARS - 3) for i in range(MAX_STOPS - 1)]
    partial = "The capital of France is"  # the output of a greedy continuation starts with " Paris"
    boom, spin = [{"role": "user", "content": "boom"}], [{"role": "user", "content": "spin"}]
    return {
        "chat template 'a' * 10**10 (x3)": (lambda c, _: c.chat(boom, 5), 3),
        "chat template nested range loops (x3)": (lambda c, _: c.chat(spin, 5), 3),
        # More renders at once than the server has gRPC worker threads (--max-batch + --max-queue + 16).
        "chat template nested range loops (x90)": (lambda c, _: c.chat(spin, 5), 90),
        "HTTP chat template nested range loops (x3)": (
            lambda _, url: http_post(url, "/v1/chat/completions", {"messages": spin, "max_tokens": 5}), 3),
        # The stop-string rows run three 200-token generations beside the unrelated request: this
        # row is the same without stop strings, so the difference is the stop strings' cost.
        "control: three plain 200-token generations (x3)": (
            lambda c, _: c.generate(partial, 200, temperature=0.0, ignore_eos=True), 3),
        f"stop strings at the limit, {MAX_STOPS} x {MAX_STOP_CHARS} chars, one partial (x3)": (
            lambda c, _: c.generate(partial, 200, temperature=0.0, ignore_eos=True,
                                    stop=long_stops + [" Paris" + "y" * (MAX_STOP_CHARS - 6)]), 3),
        "stop strings over the limit, 1000 x 1003 chars (x3)": (
            lambda c, _: c.generate(partial, 200, stop=["z" * 1003 + str(i) for i in range(1000)]), 3),
        "Tokenize 1 MB of one letter (x8)": (lambda c, _: c.tokenize(MEGABYTE_TEXT), 8),
        "Generate with a 1 MB one-letter prompt (x8)": (lambda c, _: c.generate(MEGABYTE_TEXT, 5), 8),
        "Chat with a 1 MB one-letter message (x8)": (
            lambda c, _: c.chat([{"role": "user", "content": MEGABYTE_TEXT}], 5), 8),
        "HTTP /tokenize 1 MB of one letter (x8)": (
            lambda _, url: http_post(url, "/tokenize", {"content": MEGABYTE_TEXT}), 8),
        "HTTP /v1/completions with a 1 MB one-letter prompt (x8)": (
            lambda _, url: http_post(url, "/v1/completions", {"prompt": MEGABYTE_TEXT, "max_tokens": 5}), 8),
    }


def sigterm_exit_seconds(server, attack, copies: int) -> float:
    """Seconds from SIGTERM to the server's exit while `copies` calls of attack(client) run."""
    def one():
        with Client(server.target, timeout=300) as client:
            try:
                attack(client)
            except grpc.RpcError:
                pass

    threads = [threading.Thread(target=one, daemon=True) for _ in range(copies)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the calls are in the server
    start = time.perf_counter()
    server.terminate(timeout=600)
    return round(time.perf_counter() - start, 1)


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
            baseline = statistics.median(unrelated_latency(target) for _ in range(UNRELATED_SAMPLES))
            results = {"baseline_unrelated_seconds_median": round(baseline, 3), "attacks": {}}
            with MemorySampler(pid) as memory:
                results["baseline_rss_mb"] = memory.rss() >> 20
                results["baseline_rss_with_children_mb"] = memory.tree_rss() >> 20
            for name, (attack, copies) in attacks().items():
                if args.only not in name:
                    continue
                outcome = run_attack(target, server.http_url, pid, attack, copies)
                outcome["worst_slowdown"] = round(outcome["unrelated_seconds_worst"] / baseline, 2)
                results["attacks"][name] = outcome
                print(name, outcome, flush=True)
            results["undecodable_requests"] = undecodable(target)
            if args.soak:
                results["soak"] = soak(target, pid, args.soak)
            results["sigterm_exit_seconds_during_8_tokenize_1mb"] = sigterm_exit_seconds(server, lambda c: c.tokenize(MEGABYTE_TEXT), 8)
            print(json.dumps(results, indent=2))
            if args.out:
                args.out.write_text(json.dumps(results, indent=2) + "\n")
        finally:
            if server.process.poll() is None:
                server.terminate(timeout=60)


if __name__ == "__main__":
    main()
