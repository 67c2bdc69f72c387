"""The HTTP front of `rz serve`: the OpenAI- and Ollama-compatible APIs, /health, /metrics,
/tokenize and /detokenize, served by uvicorn in a thread of the server's process.

It is a thin adapter over the same engine loop as gRPC (shared slots, batching and metrics). With
--api-key every route but /health needs `Authorization: Bearer <key>`. Errors take the shape of
the API a route belongs to: {"error": "..."} under /api/ (Ollama), OpenAI's error object elsewhere.
"""

import logging
import socket
import threading

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rz.errors import RzError
from rz.request import check_token_ids
from rz.server import http_ollama, http_openai
from rz.server.guard import authorization_matches, expected_authorization
from rz.server.http_common import (
    Attached, Backend, HttpError, count_refusal, field, http_status, run_sync, run_while_connected,
)
from rz.server.metrics import Metrics

log = logging.getLogger("rz.server")

_OPEN_PATHS = ("/health",)
_SHUTDOWN_SECONDS = 2.0  # for uvicorn to close connections once the engine loop has drained


class HttpFront:
    """The HTTP API on one port, answering 503 until attach() hands it the loaded model."""

    def __init__(self, metrics: Metrics, max_request_bytes: int, api_key: str | None):
        self.backend = Backend(metrics, max_request_bytes)
        self.app = build_app(self.backend, api_key)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def attach(self, llm, loop, model_name: str) -> None:
        self.backend.attached = Attached(llm, loop, model_name)

    def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port) and serve in a thread; returns the port. OSError if it cannot bind."""
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host.strip("[]"), port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=_SHUTDOWN_SECONDS)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [listener]}, name="rz-http", daemon=True)
        self._thread.start()
        return listener.getsockname()[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(_SHUTDOWN_SECONDS + 1)


def build_app(backend: Backend, api_key: str | None) -> Starlette:
    async def health(request: Request):
        if backend.attached is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request):
        return Response(generate_latest(backend.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def tokenize(request: Request):
        body = await backend.json(request)
        content = field(body, "content", str)
        if content is None:
            raise HttpError(400, "'content' (the text to tokenize) is required", param="content")
        add_special = field(body, "add_special", bool, False)
        llm = backend.ready().llm
        special = field(body, "parse_special", bool, True)
        tokens = await run_while_connected(request, lambda: llm.tokenize(content, add_bos=add_special, special=special))
        return JSONResponse({"tokens": tokens})

    async def detokenize(request: Request):
        body = await backend.json(request)
        tokens = field(body, "tokens", list, [])
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise HttpError(400, "'tokens' must be an array of integer token ids", param="tokens")
        llm = backend.ready().llm
        check_token_ids(tokens, llm.config.n_vocab)
        return JSONResponse({"content": await run_sync(llm.detokenize, tokens)})

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        *http_openai.routes(backend),
        *http_ollama.routes(backend),
    ]

    async def failed(request: Request, error: Exception):
        if isinstance(error, HTTPException):  # Starlette's own: no such route, or method
            status, message = error.status_code, f"{request.method} {request.url.path}: {error.detail}"
        else:
            method = f"{request.method} {request.url.path}"
            status, message = http_status(error, method), str(error)
            count_refusal(backend.metrics, method, status, error)
        param = getattr(error, "param", None)
        return JSONResponse(_error_body(request.url.path, status, message, param), status_code=status)

    # RzError and HTTPException are answered by Starlette's exception middleware; anything else
    # reaches its server-error middleware, which answers with `failed` too, then re-raises for uvicorn to log.
    app = Starlette(routes=routes, exception_handlers={RzError: failed, HTTPException: failed, Exception: failed})
    expected = expected_authorization(api_key)
    if expected is None:
        return app
    return _Authenticating(app, expected)


def _error_body(path: str, status: int, message: str, param: str | None = None) -> dict:
    api = http_ollama if path.startswith("/api/") else http_openai
    return api.error_body(status, message, param)


class _Authenticating:
    """ASGI middleware: a request without `Authorization: Bearer <key>` gets 401 before it is read."""

    def __init__(self, app, expected: bytes):
        self.app = app
        self.expected = expected

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization")
        if given is not None and authorization_matches(given, self.expected):
            return await self.app(scope, receive, send)
        message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
        response = JSONResponse(_error_body(scope["path"], 401, message), status_code=401)
        await response(scope, receive, send)
