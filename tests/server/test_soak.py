"""A soak: 1,000 requests from 8 concurrent clients, random lengths, random cancellations and
deadlines; no unexpected error, and no growth of the server's resident memory.

Generations are one or two tokens, so the run is mostly admissions and departures, the
bookkeeping a leak would come from, and fits in a few minutes on two cores."""

import random
import threading

import grpc
import pytest

pytestmark = pytest.mark.slow

N_REQUESTS = 1000
N_CLIENTS = 8
BASELINE_AFTER = 100
_WORDS = "river stone garden window music story morning island forest bridge silver paper engine".split()


def test_soak(server):
    lock = threading.Lock()
    issued = [0]
    finished = [0]
    unexpected = []
    rss = {}

    def next_index():
        with lock:
            if issued[0] == N_REQUESTS:
                return None
            issued[0] += 1
            return issued[0]

    def done():
        with lock:
            finished[0] += 1
            if finished[0] == BASELINE_AFTER:
                rss["baseline"] = server.metrics()[("process_resident_memory_bytes", ())]

    def client_thread(seed):
        rng = random.Random(seed)
        with server.client() as client:
            while (index := next_index()) is not None:
                prompt = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 30)))
                action = rng.random()
                timeout = rng.uniform(0.05, 1.0) if action < 0.1 else None
                options = {"temperature": rng.choice([0.0, 0.8]), "seed": index, "timeout": timeout}
                try:
                    stream = client.stream(prompt, rng.randint(1, 2), **options)
                    if action > 0.9:  # the client walks away after the first message
                        next(stream)
                        stream.close()
                    else:
                        last = list(stream)[-1]
                        if last.finish_reason not in ("stop", "length"):
                            unexpected.append(f"request {index}: finish reason {last.finish_reason}")
                except grpc.RpcError as error:
                    if not (timeout is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED):
                        unexpected.append(f"request {index}: {error.code().name}: {error.details()}")
                done()

    threads = [threading.Thread(target=client_thread, args=(seed,)) for seed in range(N_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not unexpected, unexpected[:10]
    after = server.metrics()[("process_resident_memory_bytes", ())]
    assert after <= 1.10 * rss["baseline"], f"resident memory grew from {rss['baseline']:.3e} to {after:.3e} bytes"
