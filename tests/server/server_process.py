"""Running a real `python -m rz serve` on loopback, with SmolLM2 135M, for the server tests."""

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from rz.client import Client
from rz.model_files import smollm2_135m_path

N_CTX = 256
MAX_BATCH = 4
MAX_QUEUE = 12  # 16 requests in flight at most: the concurrency test's 16 clients all fit
STARTUP_TIMEOUT = 900  # seconds to load and compile on a slow, shared CI machine

_LISTENING = re.compile(r"listening on [\d.]+:(\d+), metrics on http://[\d.]+:(\d+)/metrics(?:, HTTP API on http://[\d.]+:(\d+))?")


@dataclass
class RunningServer:
    process: subprocess.Popen
    port: int
    metrics_port: int
    health_seen: list[str]  # distinct health statuses, in the order they were seen while starting
    log: list[str] = field(default_factory=list)
    http_port: int | None = None  # None: started with --http-port -1

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **kwargs) -> Client:
        return Client(self.target, **kwargs)

    def metrics(self) -> dict[tuple, float]:
        """Every sample of a scrape: (name, sorted labels) -> value."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def terminate(self, timeout: float) -> int:
        """SIGTERM; the exit status (the process is killed if it does not exit in time)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise


def generate_concurrently(server: RunningServer, prompts: list[str], max_tokens: list[int], **options) -> list:
    """Each prompt from a client of its own, all at once: the completions, in order."""
    results, errors = {}, []

    def ask(index):
        try:
            with server.client() as client:
                results[index] = client.generate(prompts[index], max_tokens[index], **options)
        except Exception as error:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [results[index] for index in range(len(prompts))]


def wait_for(condition, timeout: float = 60.0) -> None:
    """Poll condition() until it holds; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def start_server(*extra_args: str, env: dict | None = None) -> RunningServer:
    """Start a server on free ports and wait for SERVING, recording the health statuses on the way
    (extra_args come last: a flag given there overrides the defaults here, --model included)."""
    command = [
        sys.executable, "-m", "rz", "serve", "--model", str(smollm2_135m_path()), "--n-ctx", str(N_CTX),
        "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE), "--port", "0", "--metrics-port", "0",
        "--http-port", "0", *extra_args,
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    log: list[str] = []
    ports = threading.Event()
    found = {}

    def read_log():
        for line in process.stderr:
            log.append(line)
            match = _LISTENING.search(line)
            if match:
                found["ports"] = int(match[1]), int(match[2])
                found["http_port"] = int(match[3]) if match[3] else None
                ports.set()

    threading.Thread(target=read_log, daemon=True).start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not ports.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the server did not start:\n" + "".join(log))
    port, metrics_port = found["ports"]
    seen = []
    with Client(f"127.0.0.1:{port}", timeout=5) as client:
        while not seen or seen[-1] != "SERVING":
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the server never became SERVING (saw {seen}):\n" + "".join(log))
            status = client.health()
            if not seen or seen[-1] != status:
                seen.append(status)
            time.sleep(0.05)
    # Compiled in the background after SERVING; tests that count compilations need them all.
    while not any("background warm-up done" in line for line in log):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the server did not finish its warm-up:\n" + "".join(log))
        time.sleep(0.1)
    return RunningServer(process, port, metrics_port, seen, log, http_port=found["http_port"])
