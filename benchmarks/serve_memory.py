"""Issue 17's server memory workload: a server's peak resident memory (VmHWM) after 8 concurrent
/v1/completions of 3,226 prompt tokens each (token ids, 16 generated, greedy), SmolLM2 Q4_1 with
8 streams of 4,096 positions and the f16 KV cache, rz serve or llama-server, one at a time.

    python benchmarks/serve_memory.py rz
    python benchmarks/serve_memory.py llama-server --llama-server path/to/llama-server

rz's figure is taken once its background warm-up is done (every shape compiled), as a server
that has been up for a while; llama-server runs with --no-repack (its REPACK/AMX buffers crash
on AMX CPUs; see serve_vs_llama_server.sh for how to build it). Prints the peak after start,
after the requests, and the largest anonymous mappings (the KV pool among them).
"""

import argparse
import concurrent.futures
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
N_STREAMS, N_CTX, PROMPT_TOKENS, MAX_TOKENS = 8, 4096, 3226, 16


def status_mib(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key):
            return int(line.split()[1]) // 1024
    raise KeyError(key)


def largest_anonymous_mib(pid: int, count: int = 8) -> list[tuple[int, int]]:
    """(resident, size) in MiB of the process's largest anonymous mappings, by residency."""
    found, current = [], None
    for line in open(f"/proc/{pid}/smaps"):
        parts = line.split()
        if "-" in parts[0] and not parts[0].endswith(":"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            current = (end - start) if len(parts) <= 5 else None
        elif parts[0] == "Rss:" and current is not None:
            found.append((int(parts[1]) // 1024, current >> 20))
    return sorted(found, reverse=True)[:count]


def wait_for(check, what: str, timeout_s: float = 600.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if check():
            return
        time.sleep(1)
    raise SystemExit(f"timed out waiting for {what}")


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def complete(url: str, index: int) -> dict:
    ids = [int(x) for x in np.random.default_rng(index).integers(100, 40000, PROMPT_TOKENS)]
    body = json.dumps({"prompt": ids, "max_tokens": MAX_TOKENS, "temperature": 0.0, "model": "m"}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=900) as reply:
        return json.load(reply)["usage"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("server", choices=("rz", "llama-server"))
    parser.add_argument("--llama-server", help="the llama-server binary")
    parser.add_argument("--port", type=int, default=18291)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from rz.model_files import smollm2_135m_path

    model, url = str(smollm2_135m_path()), f"http://127.0.0.1:{args.port}"
    log = open(f"/tmp/serve_memory-{args.server}.log", "w")
    if args.server == "rz":
        command = [sys.executable, "-m", "rz", "serve", "--model", model, "--n-ctx", str(N_CTX), "--max-batch", str(N_STREAMS),
                   "--port", str(args.port + 1), "--http-port", str(args.port), "--metrics-port", "-1"]
    else:
        if not args.llama_server:
            raise SystemExit("--llama-server: the llama-server binary to run")
        command = [args.llama_server, "-m", model, "-t", "2", "-tb", "2", "-c", str(N_STREAMS * N_CTX),
                   "--parallel", str(N_STREAMS), "--port", str(args.port), "--no-repack"]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        wait_for(lambda: healthy(url), "the server's health")
        if args.server == "rz":
            wait_for(lambda: "background warm-up done" in Path(log.name).read_text(), "rz's background warm-up")
        print(f"{args.server}: after start, VmHWM {status_mib(server.pid, 'VmHWM')} MiB")
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(N_STREAMS) as pool:
            usages = list(pool.map(lambda i: complete(url, i), range(N_STREAMS)))
        print(f"{N_STREAMS} requests of {[u['prompt_tokens'] for u in usages][0]} prompt tokens in "
              f"{time.perf_counter() - started:.1f} s")
        print(f"{args.server}: after the requests, VmHWM {status_mib(server.pid, 'VmHWM')} MiB, "
              f"VmRSS {status_mib(server.pid, 'VmRSS')} MiB")
        print("largest anonymous mappings (resident, size) MiB:", largest_anonymous_mib(server.pid))
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
