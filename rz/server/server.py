"""The serving process: gRPC (inference, health, reflection) and metrics up first, then the model.

Health is NOT_SERVING while the model loads and every step compiles, SERVING once warm. On
SIGTERM the server stops accepting, lets in-flight requests finish within the grace period,
cancels what is left (each gets a last message, finish reason cancelled) and exits 0; during
loading and compiling it exits at once.

The gRPC port is bound without SO_REUSEPORT (gRPC's default sets it), so a second server on a
taken port fails with "address in use" instead of silently taking half the connections. With
--api-key every call but health checks needs `authorization: Bearer <key>` (rz.server.guard);
with --tls-cert/--tls-key the port speaks TLS.
"""

import ipaddress
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rz import multihost
from rz.api.v1 import inference_pb2 as pb
from rz.api.v1 import inference_pb2_grpc as pb_grpc
from rz.errors import RzError
from rz.server.guard import Guard
from rz.server.metrics import Metrics
from rz.server.service import SERVICE_NAME, InferenceService
from rz.tokenizer.long_texts import LONG_TEXTS

log = logging.getLogger("rz.server")

# gRPC itself refuses messages over this many times --max-request-bytes (RESOURCE_EXHAUSTED);
# between the two, rz answers INVALID_ARGUMENT with the sizes.
_TRANSPORT_LIMIT_FACTOR = 4
_SWITCH_INTERVAL_SECONDS = 0.0005
# Worker threads beyond one per admissible stream: unary calls, health watches, refusals.
_SPARE_WORKERS = 16


@dataclass(frozen=True)
class ServerConfig:
    """What `python -m rz serve` was asked for (its options document each field and hold the defaults)."""

    model: Path
    n_ctx: int | None  # None: rz.LLM's default
    max_batch: int
    max_queue: int
    host: str
    port: int  # 0: any free port
    metrics_port: int  # 0: any free port; -1: no metrics endpoint
    grace_seconds: float
    max_request_bytes: int
    # The longest prompt chunk run between two decode steps. Measured on SmolLM2 with 2,048
    # positions, a 1,500-token prompt arriving while another stream decodes: that stream's longest
    # wait for a token was 2.5 s in 512-token chunks, 1.3 s in 256 and 0.8 s in 128, and the
    # prompt's first token came after 7.3, 7.8 and 9.5 s.
    prefill_chunk: int = 256
    api_key: str | None = None  # None: no authentication
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, the port speaks TLS
    tls_key: Path | None = None  # PEM private key
    http_port: int = 8080  # the OpenAI/Ollama HTTP API; 0: any free port; -1: none
    cache_type_k: str = "f16"  # how the KV cache stores keys and values: llama.cpp's names
    cache_type_v: str = "f16"
    kv_cache_tokens: int | None = None  # the KV cache's pool in positions; None: max_batch x n_ctx (rz.kv_blocks)
    tensor_parallel: int = 1  # devices the model is split over (rz.sharding)
    data_parallel: int = 1  # engine replicas, each with max_batch slots on tensor_parallel devices of its own
    speculative: str | None = None  # the proposer of requests that name none (rz.speculative); None: off
    self_draft_layers: int | None = None  # the layers speculative="self" drafts with; None: its default
    draft_model: str | None = None  # the GGUF speculative="draft" drafts with (the model's vocabulary); None: none


class ServerStartError(RzError):
    """The server cannot listen as configured (a port in use, unreadable TLS files)."""


class Server:
    """One model served over gRPC, with health, reflection and Prometheus metrics."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.metrics = Metrics()
        self.service = InferenceService(self.metrics, config.max_request_bytes)
        self.health = health.HealthServicer()
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_batch * config.data_parallel + config.max_queue + _SPARE_WORKERS),
            interceptors=[Guard(self.metrics, config.api_key)],
            options=[
                ("grpc.max_receive_message_length", _TRANSPORT_LIMIT_FACTOR * config.max_request_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_InferenceServiceServicer_to_server(self.service, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )
        self.port = _bind(self._grpc, config)
        self.metrics_port = None
        self._metrics_http = None
        self._loop = None
        self._llm = None
        self.http_port = None
        self.http = None
        if config.http_port >= 0:
            from rz.server.http_app import HttpFront

            self.http = HttpFront(self.metrics, config.max_request_bytes, config.api_key)

    def start(self) -> None:
        """Listen, reporting NOT_SERVING until load() is done."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._grpc.start()
        if self.config.metrics_port >= 0:
            try:
                self._metrics_http = self.metrics.serve(self.config.metrics_port, self.config.host)
            except OSError as error:
                self._grpc.stop(0)
                raise ServerStartError(
                    f"cannot serve metrics on {self.config.host}:{self.config.metrics_port}: {error.strerror or error} "
                    "(choose another --metrics-port, 0 for any free one, or -1 for no metrics)"
                ) from None
            self.metrics_port = self._metrics_http.server_port
        if self.http is not None:
            try:
                self.http_port = self.http.start(self.config.host, self.config.http_port)
            except OSError as error:
                self._grpc.stop(0)
                if self._metrics_http is not None:
                    self._metrics_http.shutdown()
                raise ServerStartError(
                    f"cannot serve HTTP on {self.config.host}:{self.config.http_port}: {error.strerror or error} "
                    "(choose another --http-port, 0 for any free one, or -1 for no HTTP API)"
                ) from None

    def load(self) -> None:
        """Load the model, compile what a first request needs, start the engine loop (which compiles
        the other shapes while idle), and report SERVING."""
        from rz.buckets import Buckets
        from rz.engine import Engine
        from rz.scheduler import Scheduler
        from rz.server.scheduler import EngineLoop
        from rz.warm_up import FIRST_REQUEST_UNITS, warm_up, warm_up_units

        llm = self._llm = _load_llm(self.config)
        log.info("loaded %s in %.1f s; compiling", llm, llm.load_seconds)
        _report_chat_template(llm)
        buckets = Buckets.for_context(llm.n_ctx, largest=self.config.prefill_chunk)
        engines = [
            Engine(
                model, llm.tokenizer, llm.n_ctx, self.config.max_batch, buckets=buckets, cache_types=llm.cache_types,
                speculative=self.config.speculative, self_draft_layers=self.config.self_draft_layers,
                draft_model=llm.draft_model, kv_cache_tokens=self.config.kv_cache_tokens,
            )
            for model in llm.replicas
        ]
        engine = engines[0]
        log.info("%s", engine.plan.summary())
        # What a first short request needs compiles now; the rest while the server is idle.
        units = warm_up_units(engine)
        scheduler = Scheduler(engine)
        for unit in units[:FIRST_REQUEST_UNITS]:
            unit(scheduler)
        # Data parallelism: each other replica compiles its own steps (its mesh is a static
        # argument), all of them before serving; the loop's idle warm-up is the first replica's.
        for replica in engines[1:]:
            warm_up(replica)
        log.info("compiled %d steps in %.1f s; the other shapes compile in the background",
                 len(engine.compilations), sum(engine.compilations.values()))
        self.metrics.slots.set(sum(each.n_slots for each in engines))
        self.metrics.watch_compilations(engine.compilations)
        self.metrics.watch_speculation(
            lambda: (sum(each.n_drafted for each in engines), sum(each.n_accepted for each in engines))
        )
        self._loop = EngineLoop(engine, self.config.max_queue, warm_up=units[FIRST_REQUEST_UNITS:], replicas=engines[1:])
        self.metrics.watch_load(self._loop.load)
        self.metrics.watch_warm_up(self._loop.warm_up_pending)
        self._loop.start()
        self.service.attach(llm, self._loop, _model_info(llm, self.config))
        if self.http is not None:
            self.http.attach(llm, self._loop, Path(self.config.model).stem)
        self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def shutdown(self) -> None:
        """Stop accepting; give in-flight requests the grace period, cancel the rest, stop."""
        grace = self.config.grace_seconds
        self.health.enter_graceful_shutdown()
        if self._loop is not None:
            self._loop.stop_accepting()
        stopped = self._grpc.stop(grace)  # new calls are refused from now; running ones are cut at `grace`
        # Calls waiting for a long text's turn would hold the exit for seconds each.
        LONG_TEXTS.drop_all()
        if self._loop is not None:
            margin = min(1.0, grace / 2)  # for the last messages of cancelled requests to go out
            if not self._loop.drain(grace - margin):
                log.info("grace period over: cancelling the requests still running")
                self._loop.cancel_all()
                self._loop.drain(margin)
            self._loop.stop()
        if self._llm is not None:
            multihost.close(self._llm.model)  # the engine loop has stopped: no step follows
        stopped.wait()
        if self.http is not None:
            self.http.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()

    def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)


def _bind(server: grpc.Server, config: ServerConfig) -> int:
    """Add the listening port, with TLS when configured; returns the port number."""
    address = f"{config.host}:{config.port}"
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ServerStartError("TLS needs both --tls-cert and --tls-key")
    try:
        if config.tls_cert is None:
            return server.add_insecure_port(address)
        try:
            pair = (Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())
        except OSError as error:
            raise ServerStartError(f"cannot read the TLS files: {error}") from None
        return server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
    except RuntimeError:
        raise ServerStartError(
            f"cannot listen on {address}: address in use (another server?) or not an address of this machine"
        ) from None


def warn_if_exposed(config: ServerConfig) -> None:
    """Warn when the server listens beyond loopback without an API key."""
    if not config.api_key and not is_loopback(config.host):
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the server", config.host)


def is_loopback(host: str) -> bool:
    """Whether host names this machine's loopback interface only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _report_chat_template(llm) -> None:
    """Log, at load, a chat template that cannot render even a one-message chat (rz.LLM found it)."""
    if llm.chat_template_problem is not None:
        log.error(
            "the model's chat template cannot render even a one-message chat, so chat requests will fail "
            "(FAILED_PRECONDITION; HTTP 400) while completions work: %s", llm.chat_template_problem,
        )


def _model_info(llm, config: ServerConfig) -> pb.ModelInfoResponse:
    import jax

    from rz.model_info import model_info

    summary = model_info(llm.gguf)
    device = jax.devices()[0]
    return pb.ModelInfoResponse(
        name=llm.config.name,
        architecture=llm.config.architecture,
        context_size=llm.n_ctx,
        trained_context_size=llm.config.context_length,
        vocab_size=llm.config.n_vocab,
        parameters=summary["parameters"],
        quantization=[
            pb.QuantizationType(type=name, tensors=entry["tensors"], bytes=entry["bytes"])
            for name, entry in summary["quantization"].items()
        ],
        kernels=_kernel_paths(),
        max_batch=config.max_batch,
        max_queue=config.max_queue,
        backend=f"{device.platform} ({device.device_kind})",
        has_chat_template=llm.config.chat_template is not None,
        end_of_generation_ids=sorted(llm.tokenizer.eog_ids),
    )


def _kernel_paths() -> dict[str, str]:
    """Each op's implementations on this backend, by size range (rz_kernels.describe_paths)."""
    import rz_kernels

    paths: dict[str, list[str]] = {}
    for row in rz_kernels.describe_paths():
        low, high = row.get("m_min", row.get("t_min")), row.get("m_max", row.get("t_max"))
        span = f"{low}-{high}" if high is not None else f"{low}+"
        types = ",".join(row["types"]) if "types" in row else "*"
        note = f"; {row['note']}" if row.get("note") else ""
        paths.setdefault(row["op"], []).append(f"{row['path']} ({types}; rows {span}{note})")
    return {op: "; ".join(items) for op, items in paths.items()}


def serve(config: ServerConfig) -> int:
    """Run a server until SIGTERM or SIGINT; returns the exit status."""
    wake = threading.Event()  # a signal arrived, or loading ended
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: (stop.set(), wake.set()))
    warn_if_exposed(config)
    # The engine loop shares the interpreter with request threads that may run pure Python for
    # seconds (tokenizing a megabyte): each time the loop comes back from a compiled step it
    # waits for the interpreter lock up to this interval (default 5 ms), several times a step.
    sys.setswitchinterval(_SWITCH_INTERVAL_SECONDS)
    server = Server(config)
    server.start()
    metrics = f", metrics on http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
    http = f", HTTP API on http://{config.host}:{server.http_port}" if server.http_port else ""
    log.info("listening on %s:%d%s%s; loading %s", config.host, server.port, metrics, http, config.model)
    # Loading and compiling run beside the main thread, so a signal meanwhile is acted on at once
    # rather than after compilation (up to minutes on a cold cache).
    failures = []
    loading = threading.Thread(target=_load, args=(server, failures, wake), name="rz-load", daemon=True)
    loading.start()
    wake.wait()
    if stop.is_set() and loading.is_alive():
        log.info("stopped while loading")
        server.shutdown()
        logging.shutdown()
        # The loading thread is inside XLA's compiler, which cannot be interrupted; ending the
        # process is the prompt way out, and nothing is in flight yet.
        os._exit(0)
    if failures:
        server.shutdown()
        raise failures[0]
    log.info("serving")
    stop.wait()
    log.info("shutting down (grace period %g s)", config.grace_seconds)
    server.shutdown()
    log.info("stopped")
    return 0


def follow(config: ServerConfig) -> int:
    """A process other than 0 of a mesh over several: its shards of the model, every step as
    process 0 runs it (rz.multihost), until process 0 stops; it serves nothing itself."""
    import jax

    llm = _load_llm(config)
    log.info("process %d: loaded %s in %.1f s; following process 0", jax.process_index(), llm, llm.load_seconds)
    multihost.follow(llm.model)
    log.info("process 0 stopped")
    return 0


def _load_llm(config: ServerConfig):
    from rz.llm import LLM

    return LLM(
        config.model, n_ctx=config.n_ctx, max_batch=config.max_batch, cache_type_k=config.cache_type_k,
        cache_type_v=config.cache_type_v, tensor_parallel=config.tensor_parallel, data_parallel=config.data_parallel,
        self_draft_layers=config.self_draft_layers, draft_model=config.draft_model,
    )


def _load(server: Server, failures: list, done: threading.Event) -> None:
    try:
        server.load()
    except BaseException as error:  # noqa: BLE001 - handed to the main thread, which raises it
        failures.append(error)
    finally:
        done.set()
