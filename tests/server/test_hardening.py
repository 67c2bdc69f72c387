"""Serving edges: ports that are taken, bytes that do not decode, the API key, TLS, and SIGTERM
while the model loads. Most need no model: a server that has not loaded one still listens."""

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest

from rz.client import Client
from rz.model_files import smollm2_135m_path
from rz.server.server import Server, ServerConfig, ServerStartError, is_loopback, warn_if_exposed
from rz.server.service import CLIENT_CANCELLED, DEADLINE_EXCEEDED, _termination_reason

TOKENIZE = "/rz.v1.InferenceService/Tokenize"
GENERATE = "/rz.v1.InferenceService/Generate"


def config(**changes) -> ServerConfig:
    fields = dict(
        model=Path("unused.gguf"), n_ctx=None, max_batch=2, max_queue=2, host="127.0.0.1", port=0,
        metrics_port=-1, grace_seconds=1.0, max_request_bytes=1 << 20, http_port=-1,
    )
    return ServerConfig(**(fields | changes))


@pytest.fixture
def started():
    servers = []

    def start(**changes) -> Server:
        server = Server(config(**changes))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()


def test_a_second_server_on_a_taken_port_fails_with_address_in_use(started):
    first = started()
    with pytest.raises(ServerStartError, match="address in use"):
        Server(config(port=first.port))


def test_a_taken_metrics_port_is_a_clean_error(started):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServerStartError, match="cannot serve metrics.*--metrics-port"):
            started(metrics_port=taken.getsockname()[1])


def test_the_cli_reports_a_taken_port_without_a_traceback():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "rz", "serve", "--model", "unused.gguf", "--port", "0", "--metrics-port", str(port),
             "--http-port", "-1"],
            capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 2
    assert "rz: error: cannot serve metrics" in result.stderr and "Traceback" not in result.stderr


# Corrupt protobuf, and a TokenizeRequest whose text (field 1) is not UTF-8.
UNDECODABLE = [b"\xff\xff\xff\xff", b"\x0a\x02\xff\xfe"]


@pytest.mark.parametrize("payload", UNDECODABLE, ids=["corrupt", "invalid-utf8"])
def test_undecodable_requests_are_invalid_argument_and_counted(started, payload):
    server = started()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        tokenize = channel.unary_unary(TOKENIZE)
        generate = channel.unary_stream(GENERATE)
        with pytest.raises(grpc.RpcError) as unary:
            tokenize(payload, timeout=10)
        with pytest.raises(grpc.RpcError) as streamed:
            list(generate(payload, timeout=10))
    assert unary.value.code() == streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not decode" in unary.value.details()
    counted = server.metrics.requests.labels
    assert counted("Tokenize", "INVALID_ARGUMENT")._value.get() == 1
    assert counted("Generate", "INVALID_ARGUMENT")._value.get() == 1


def test_with_an_api_key_only_health_is_open(started):
    server = started(api_key="s3cret")
    target = f"127.0.0.1:{server.port}"
    for key in (None, "wrong"):
        with Client(target, timeout=10, api_key=key) as client:
            assert client.health() == "NOT_SERVING"  # health checks need no key
            with pytest.raises(grpc.RpcError) as refused:
                client.tokenize("hi")
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "Bearer" in refused.value.details()
    with Client(target, timeout=10, api_key="s3cret") as client:
        with pytest.raises(grpc.RpcError) as passed:
            client.tokenize("hi")
    assert passed.value.code() == grpc.StatusCode.UNAVAILABLE  # past the key: the model is not loaded
    assert server.metrics.requests.labels("Tokenize", "UNAUTHENTICATED")._value.get() == 2


def test_tls_with_a_self_signed_certificate(started, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    server = started(tls_cert=cert, tls_key=key, api_key="k")
    with Client(f"localhost:{server.port}", timeout=10, tls_ca=cert, api_key="k") as client:
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as passed:
            client.tokenize("hi")
        assert passed.value.code() == grpc.StatusCode.UNAVAILABLE
    with Client(f"localhost:{server.port}", timeout=3) as plain:
        with pytest.raises(grpc.RpcError):
            plain.health()
    with pytest.raises(ServerStartError, match="both --tls-cert and --tls-key"):
        Server(config(tls_cert=cert))


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "::1", "[::1]", "localhost", "127.5.5.5"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.com"]))


def test_a_warning_when_listening_beyond_loopback_without_a_key(caplog):
    warn_if_exposed(config(host="0.0.0.0", api_key="k"))
    warn_if_exposed(config(host="127.0.0.1"))
    assert not caplog.records
    warn_if_exposed(config(host="0.0.0.0"))
    assert "without --api-key" in caplog.text


def test_a_deadline_just_fired_counts_as_a_deadline_not_a_cancel():
    assert _termination_reason(SimpleNamespace(time_remaining=lambda: 0.0)) == DEADLINE_EXCEEDED
    assert _termination_reason(SimpleNamespace(time_remaining=lambda: 0.004)) == DEADLINE_EXCEEDED
    assert _termination_reason(SimpleNamespace(time_remaining=lambda: 30.0)) == CLIENT_CANCELLED


@pytest.mark.slow
def test_sigterm_while_loading_exits_promptly():
    process = subprocess.Popen(
        [sys.executable, "-m", "rz", "serve", "--model", str(smollm2_135m_path()), "--port", "0",
         "--metrics-port", "-1", "--http-port", "-1", "--n-ctx", "256"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        log = []
        for line in process.stderr:
            log.append(line)
            if "listening on" in line:
                break
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(timeout=30) == 0
        elapsed = time.monotonic() - started
        log.extend(process.stderr)
        text = "".join(log)
        assert "stopped while loading" in text or "serving" in text, text
        assert elapsed < 10, text
    finally:
        if process.poll() is None:
            process.kill()


def test_a_chat_template_broken_for_every_chat_is_an_error_at_load_and_chat_calls_fail_fast_naming_it(started, caplog):
    import rz
    from rz.server.http_common import http_status
    from rz.server.server import _report_chat_template

    problem = "the chat template does not parse: TemplateSyntaxError: unexpected end of template (template line 1)"
    llm = SimpleNamespace(chat_template_problem=problem, tokenize=lambda text, add_bos=None, special=False: [1, 2])
    llm.chat_prompt_ids = lambda messages, enable_thinking=None, functions=None: rz.LLM.chat_prompt_ids(
        llm, messages, enable_thinking, functions=functions
    )
    _report_chat_template(llm)
    assert [record.levelname for record in caplog.records] == ["ERROR"] and problem in caplog.text
    server = started()
    server.service.attach(llm, SimpleNamespace(), None)
    with Client(f"127.0.0.1:{server.port}", timeout=10) as client:
        with pytest.raises(grpc.RpcError) as failure:
            client.chat([{"role": "user", "content": "Hello"}], 5)
        assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "cannot render even a one-message chat" in failure.value.details() and problem in failure.value.details()
        assert client.tokenize("a b") == [1, 2]  # the rest of the service answers
    with pytest.raises(rz.errors.ChatTemplateError) as error:
        llm.chat_prompt_ids([])
    assert http_status(error.value, "chat") == 400


def test_a_template_renderer_too_busy_is_resource_exhausted():
    from rz.errors import TemplateBusyError
    from rz.server.service import status_of

    assert status_of(TemplateBusyError("8 chat templates are already waiting"), "Chat") == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_request_larger_than_the_whole_kv_cache_is_resource_exhausted_in_grpc_and_400_in_http():
    """It could never run on this server (unlike a full queue, retrying cannot help over HTTP)."""
    from rz.kv_blocks import KVCacheCapacityError
    from rz.server.http_common import http_status
    from rz.server.service import status_of

    error = KVCacheCapacityError("needs 5000 positions of KV cache, more than the 4096 the whole cache holds")
    assert status_of(error, "Generate") == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert http_status(error, "POST /v1/completions") == 400


def test_a_working_chat_template_is_not_reported(caplog):
    from rz.server.server import _report_chat_template

    _report_chat_template(SimpleNamespace(chat_template_problem=None))
    assert not caplog.records


def test_a_long_text_whose_caller_left_is_dropped_and_holds_up_no_later_text(started):
    from rz.gguf import GGUFFile
    from rz.tokenizer import Tokenizer
    from rz.tokenizer.long_texts import LONG_TEXT_CHARS

    tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(smollm2_135m_path()).metadata)
    server = started(max_request_bytes=16 << 20)
    server.service.attach(SimpleNamespace(tokenize=tokenizer.encode), SimpleNamespace(), None)
    target = f"127.0.0.1:{server.port}"
    with Client(target, timeout=1.0) as impatient:
        with pytest.raises(grpc.RpcError) as gone:
            impatient.tokenize("a" * (8 << 20))  # one word: tens of seconds of merging
        assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Had the 8 MB text kept the tokenizer's turn, this one would wait for it past its deadline.
    text = "ab" * (LONG_TEXT_CHARS // 2 + 1)
    with Client(target, timeout=15.0) as client:
        assert client.tokenize(text) == tokenizer.encode_here(text)
