"""What the first structured-output request of a fresh server pays, and what warming it at start costs.

A constrained request needs the vocabulary llguidance compiles against (built on first use), its
own constraint compiled, and the masked steps (first token and one-step decode, per batch bucket).
This starts `rz serve` on SmolLM2 with an empty compilation cache (a first deployment), waits for
/health, and times over HTTP: an unconstrained chat, then two JSON-schema chats (different schemas),
then the first again; each greedy, 16 tokens. It reports the start-up seconds and the compilations
the server counted.

    flock -x /tmp/rz-cpu.lock python benchmarks/constraint_warmup.py
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from rz.model_files import smollm2_135m_path

MESSAGES = [{"role": "user", "content": "Describe a city."}]
CITY = {"type": "object", "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["name", "population"]}
RIVER = {"type": "object", "properties": {"river": {"type": "string"}, "length_km": {"type": "number"}},
         "required": ["river", "length_km"]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except (urllib.error.HTTPError, OSError) as error:
        return getattr(error, "code", 0), b""


def chat_seconds(url: str, schema: dict | None) -> float:
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
    return time.perf_counter() - started


def compilations(url: str) -> tuple[float, float]:
    """(steps compiled, seconds compiling them) from the server's metrics."""
    text = get(f"{url}/metrics")[1].decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("rz_compilation")}
    return values["rz_compilations_total"], values["rz_compilation_seconds_total"]


def main() -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"RZ_COMPILATION_CACHE": cache}
        command = [sys.executable, "-m", "rz", "serve", "--model", str(smollm2_135m_path()), "--n-ctx", "1024",
                   "--max-batch", "4", "--port", "0", "--metrics-port", "-1", "--http-port", str(port)]
        started = time.perf_counter()
        server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
        try:
            while get(f"{url}/health")[0] != 200:
                if server.poll() is not None:
                    raise SystemExit("the server exited before it was ready")
                time.sleep(0.2)
            print(f"ready after {time.perf_counter() - started:.1f} s; compiled {compilations(url)[0]:.0f} steps "
                  f"in {compilations(url)[1]:.1f} s")
            print("| request | seconds | steps compiled so far |")
            print("|---|---|---|")
            for label, schema in (("plain", None), ("schema A (first)", CITY), ("schema B", RIVER), ("schema A again", CITY)):
                seconds = chat_seconds(url, schema)
                print(f"| {label} | {seconds:.2f} | {compilations(url)[0]:.0f} |")
        finally:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
