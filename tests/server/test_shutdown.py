"""SIGTERM: stop accepting, let short requests finish, cancel long ones at the grace period, exit 0."""

import signal

import grpc
import pytest

from server_process import start_server

pytestmark = pytest.mark.slow

GRACE_SECONDS = 4
# Long enough that no machine finishes it within the grace period (~100 tok/s here: 30 s).
LONG_TOKENS = 3000


def test_sigterm_finishes_or_cancels_in_flight_requests_and_exits_0():
    server = start_server("--grace", str(GRACE_SECONDS), "--n-ctx", "4096")
    try:
        with server.client() as client:
            long = client.stream("Tell me a long story.", LONG_TOKENS, temperature=0.0, ignore_eos=True)
            short = client.stream("Hi", 3, temperature=0.0, ignore_eos=True)
            first_long, first_short = next(long), next(short)  # both have their slots
            server.process.send_signal(signal.SIGTERM)
            short_chunks = [first_short, *short]
            long_chunks = [first_long, *long]
            with pytest.raises(grpc.RpcError) as refused:
                client.generate("Hi", 1)
        assert short_chunks[-1].finish_reason == "length"
        assert sum(len(c.token_ids) for c in short_chunks) == 3
        assert long_chunks[-1].finish_reason == "cancelled"
        assert long_chunks[-1].usage["completion_tokens"] == sum(len(c.token_ids) for c in long_chunks) < LONG_TOKENS
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert server.process.wait(timeout=GRACE_SECONDS + 30) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
